"""The artist's path in plain Python, without Blender (issue 21): names after the prompt
(blender_addon/core/names.py), style presets and variations (generation.py), the checks before a job starts
(preflight.py) and a batch of variations on a real backend worker, cancelled half-way (session.py).
tests/test_blender_artist_path.py drives the same through the installed extension in headless Blender.
"""

import os
import random
import sys
import types

import pytest

from backend.request import GenerateRequest
from syncsphere.blender_addon.core import backend_command, generation, names, preflight, session
from syncsphere.blender_addon.core.model_list import InstalledModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- names after the prompt -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,title,slug", [
    ("a sunlit alpine valley with a lake, 360 panorama", "Sunlit Alpine Valley Lake", "sunlit-alpine-valley-lake"),
    ("Alpine valley lake", "Alpine Valley Lake", "alpine-valley-lake"),
    ("a quiet harbour at dusk", "Quiet Harbour Dusk", "quiet-harbour-dusk"),
    ("the", "The", "the"),  # only small words: they are kept
    ("   ", "Untitled", "untitled"),
    ("!!!, ...", "Untitled", "untitled"),
    ("夕暮れの港, 360 panorama", "夕暮れの港", "夕暮れの港"),  # any script's words
    ("supercalifragilisticexpialidocious wonderful meadow", "Supercalifragilisticexpialidocious",
     "supercalifragilisticexpialidocious"),  # stops before MAX_CHARACTERS
])
def test_titles_and_slugs_come_from_the_prompts_first_telling_words(prompt, title, slug):
    assert names.prompt_title(prompt) == title
    assert names.prompt_slug(prompt) == slug
    assert len(title) <= names.MAX_CHARACTERS


def test_unique_names_count_up_and_keep_a_files_extension():
    assert names.unique_name("Alpine Valley", set()) == "Alpine Valley"
    assert names.unique_name("Alpine Valley", {"Alpine Valley"}) == "Alpine Valley 2"
    assert names.unique_name("Alpine Valley", {"Alpine Valley", "Alpine Valley 2"}) == "Alpine Valley 3"
    assert names.unique_name("valley.exr", {"valley.exr"}, separator="-") == "valley-2.exr"
    assert names.unique_name("Mt. Fuji", {"Mt. Fuji"}) == "Mt. Fuji 2"  # not an extension
    assert names.slug("Alpine Valley 2") == "alpine-valley-2"


def test_image_names_put_the_prompt_in_place_of_panorama():
    assert names.image_name("/out/job/panorama.exr", "alpine-valley") == "alpine-valley.exr"
    assert names.image_name("/out/job/panorama_sky.exr", "alpine-valley") == "alpine-valley_sky.exr"
    assert names.image_name("/out/job/face_F.png", "alpine-valley") == "face_F.png"


# --- style presets ----------------------------------------------------------------------------------------


def settings(**overrides):
    """A stand-in for scene.syncsphere with the defaults of blender_addon/scene/properties.py."""
    values = dict(prompt="a harbour at dusk", style="NONE", style_prompt="", negative_prompt="", mode="WORLD",
                  resolution="DRAFT", seed=3, randomize_seed=False, variations=1, steps=30, guidance=6.5,
                  quality="BALANCED", sync_method="AUTO", window=0, stride=0, device="PREFERENCES", sync_weight=20.0,
                  sync_steps=10, sync_fast=False, syncsde_lambda=5.0, mad=False, view_set="AUTO", prompt_up="",
                  prompt_down="", hdr=True, exposure=0.0, sun_ratio=6.0, use_sun_direction=False, sun_yaw=0.0,
                  sun_pitch=45.0, memory="auto", quantize="none")
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_the_styles_are_a_handful_with_none_first_adding_nothing():
    identifiers = [style[0] for style in generation.STYLES]
    assert identifiers[0] == generation.DEFAULT_STYLE == "NONE" and generation.STYLE_TEXTS["NONE"] == ("", "")
    assert 4 <= len(identifiers) <= 8 and len(set(identifiers)) == len(identifiers)
    assert {"Photographic", "Painterly", "Stylised / Game", "Sci-fi"} <= set(generation.STYLE_NAMES.values())
    for identifier in identifiers[1:]:
        style_prompt, negative = generation.STYLE_TEXTS[identifier]
        assert style_prompt and negative


@pytest.mark.parametrize("style", [style[0] for style in generation.STYLES])
def test_a_style_adds_to_the_prompt_and_fills_the_negative_prompt_the_backend_accepts(style, tmp_path):
    style_prompt, negative = generation.STYLE_TEXTS[style]
    params = generation.generate_params(settings(style=style, style_prompt=style_prompt, negative_prompt=negative),
                                        7, model="m", device="cpu")
    assert params["prompt"] == ("a harbour at dusk, " + style_prompt if style_prompt else "a harbour at dusk")
    assert params["negative_prompt"] == negative
    GenerateRequest.from_params({**params, "out": str(tmp_path)}).validated()


def test_an_edited_style_prompt_is_what_is_sent():
    params = generation.generate_params(settings(style="PAINTERLY", style_prompt=" watercolour wash ",
                                                 negative_prompt="text"), 7, model="m", device="cpu")
    assert (params["prompt"], params["negative_prompt"]) == ("a harbour at dusk, watercolour wash", "text")
    assert generation.styled_prompt("", "oil painting") == "oil painting"


# --- variations -------------------------------------------------------------------------------------------


def test_variations_run_consecutive_seeds_or_distinct_random_ones():
    assert generation.variation_seeds(settings(seed=41), 4) == [41, 42, 43, 44]
    assert generation.variation_seeds(settings(seed=generation.MAX_SEED), 2) == [generation.MAX_SEED, 0]
    assert generation.variation_seeds(settings(), 1) == [3]
    seeds = generation.variation_seeds(settings(randomize_seed=True), 8, rng=random.Random(5))
    assert len(set(seeds)) == 8 and all(0 <= seed <= generation.MAX_SEED for seed in seeds)
    assert len(generation.variation_seeds(settings(), 99)) == generation.MAX_VARIATIONS
    assert generation.variation_seeds(settings(), 0) == [3]


# --- checks before a job ----------------------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_written_is_refused_in_the_panels_words(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    problem = preflight.output_folder_problem(str(blocker / "outputs"))
    assert problem.startswith(f"The output folder {blocker / 'outputs'} cannot be written (")
    assert problem.endswith("choose another in SyncSphere Preferences › Output Folder")
    fresh = tmp_path / "new" / "outputs"
    assert preflight.output_folder_problem(str(fresh)) is None and fresh.is_dir() and not list(fresh.iterdir())


def test_a_model_that_cannot_be_loaded_is_refused_when_the_listing_can_tell(tmp_path):
    installed = [InstalledModel("someone/complete", "hub", "/cache/a", 10),
                 InstalledModel("someone/partial", "hub", "/cache/b", 5, complete=False, missing=["unet"])]
    check = preflight.model_problem
    assert check("someone/complete", installed, listed=True, online=False) is None
    assert "Backend › Model" in check("  ", installed, listed=True, online=False)
    assert check(str(tmp_path), installed, listed=False, online=False) is None  # a local folder that exists
    missing = check(str(tmp_path / "gone"), installed, listed=True, online=True)
    assert missing == f"The model {tmp_path / 'gone'} does not exist; pick another in Backend › Model"
    for model in ("someone/partial", "someone/elsewhere"):
        offline = check(model, installed, listed=True, online=False)
        assert offline.startswith(f"The model {model} is not installed and Blender's online access is off")
        assert check(model, installed, listed=True, online=True) is None  # the backend downloads it
        assert check(model, [], listed=False, online=False) is None  # nothing known: the backend decides


def test_the_backends_own_checks_run_before_a_job_in_the_panels_words(tmp_path):
    good = generation.generate_params(settings(), 7, model="m", device="cpu")
    assert preflight.request_problem(good, str(tmp_path / "job")) is None
    bad = generation.generate_params(settings(exposure=25.0), 7, model="m", device="cpu")
    assert preflight.request_problem(bad, str(tmp_path / "job")) == \
        "Lighting › Exposure must be a number of EV between -20 and 20, not 25.0."


# --- a batch of variations on a real worker ---------------------------------------------------------------


def test_a_batch_runs_its_jobs_one_after_another_and_cancel_stops_the_rest(tiny_model, tmp_path):
    """Three variations: the first finishes, the second is cancelled mid-denoising (as the Cancel button does,
    session.cancel), and the third never starts."""
    env = backend_command.backend_environment(REPO, allow_network=False)
    worker = session.get_worker(backend_command.backend_command(sys.executable), env, REPO, str(tmp_path / "log"))
    base = {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "window": 16, "device": "cpu",
            "model": tiny_model}
    runs = [(seed, {**base, "seed": seed, "steps": 2 if seed == 10 else 400}, str(tmp_path / f"job-{seed}"))
            for seed in (10, 11, 12)]
    try:
        batch = session.start_batch(worker, runs)
        assert session.is_busy() and batch.started == 1 and batch.status_text.startswith("Variation 1/3 · ")
        assert batch.job.wait(120) and batch.job.state == "done" and batch.seed == 10
        assert session.is_busy()  # done, but two more to start
        second = batch.start_next()
        assert batch.seed == 11 and batch.status_text.startswith("Variation 2/3 · ")
        while second.stage != "denoising" and not second.finished:
            second.poll(wait_s=0.5)
        session.cancel()
        assert second.wait(120) and second.state == "cancelled"
        assert batch.start_next() is None and batch.started == 2 and batch.finished and not session.is_busy()
        assert os.path.isfile(runs[0][2] + "/panorama.png")
        assert not os.path.exists(runs[1][2] + "/panorama.png") and not os.path.exists(runs[2][2])
    finally:
        session.shutdown()


def test_one_variation_shows_the_jobs_status_alone():
    batch = session.Batch(None, [(1, {}, os.path.abspath("out"))])
    assert batch.finished and batch.status_text == "Starting" and batch.seed is None
