"""Issue 18 in the add-on without Blender: the Size menu up to 8K and Custom (checked against the backend's own
rules before any job), Start from Image's params and checks, and Upscale x2 / x4 of a history item, which is the
backend's ``upscale`` command sent as a generate job (blender_addon/core/image_input.py, preflight.py)."""

import types

import numpy as np
import pytest
from PIL import Image

from backend.errors import BadRequest
from backend.request import GenerateRequest, ModelGeometry
from syncsphere.blender_addon.core import generation, image_input, preflight
from test_addon_generation import settings

SD_GEOMETRY = ModelGeometry(vae_scale_factor=8, latent_channels=4, sample_size=64)  # SD 1.x / 2-base: 512-px views


def backend_verdict(params, tmp_path, geometry=SD_GEOMETRY):
    """None when the backend accepts ``params`` for a model of ``geometry`` (validated, then sized for the model:
    everything it checks before denoising), else its sentence."""
    try:
        GenerateRequest.from_params({**params, "out": str(tmp_path / "job")}).validated().sized_for_model(geometry)
    except BadRequest as error:
        return str(error)
    return None


def test_ultra_is_8k_for_every_model_and_is_generated_at_half_then_upscaled(tmp_path):
    for window in (512, 768, 1024):
        assert generation.resolution("WORLD", "ULTRA", window) == (8192, 4096)
        for mode in generation.RESOLUTIONS:
            for preset in generation.RESOLUTIONS[mode]:
                width, height = generation.resolution(mode, preset, window)
                # Never past the backend's upscaling limit, and a world stays 2:1.
                assert max(width, height) <= 8192 and width * height <= 8192 * 4096
                assert width % 64 == 0 and height % 64 == 0 and (mode != "WORLD" or width == 2 * height)
    assert generation.resolution("WIDE", "ULTRA") == (8192, 2048)
    assert generation.resolution("TILE", "ULTRA", 1024) == (5760, 5760)  # 8192 a side would pass 8192x4096 in all
    params = generation.generate_params(settings(resolution="ULTRA"), 1, model="m", device="cpu")
    assert (params["width"], params["height"], params["upscale"]) == (4096, 2048, 2)
    assert backend_verdict(params, tmp_path) is None
    # The presets below Ultra send their size as it is, without upscaling.
    assert "upscale" not in generation.generate_params(settings(resolution="HIGH"), 1, model="m", device="cpu")


# (mode, width, height, window, expected words or None when it is valid)
CUSTOM_SIZES = [
    ("WORLD", 3008, 1504, 0, None),
    ("WIDE", 2056, 520, 0, None),
    ("TILE", 640, 640, 0, None),
    ("WORLD", 1004, 502, 0, "not a multiple of 8"),
    ("TILE", 640, 644, 0, "Height 644 px is not a multiple of 8"),
    ("WORLD", 8200, 4100, 0, "not a multiple of 8"),
    ("WORLD", 16384, 8192, 0, "larger than SyncSphere makes"),
    ("WIDE", 9216, 1024, 0, "larger than SyncSphere makes"),
    ("TILE", 6144, 6144, 0, "larger than SyncSphere makes"),
    ("WORLD", 768, 384, 0, "smaller than one view of 512 px"),
    ("WORLD", 256, 128, 16, None),  # a Window of 16 latents is a 128-px view
    ("TILE", 512, 120, 16, "smaller than one view of 128 px"),
    ("WORLD", 2048, 1000, 0, "twice as wide"),
]


@pytest.mark.parametrize("mode, width, height, window, words", CUSTOM_SIZES)
def test_a_custom_size_is_checked_before_any_job_by_the_backends_rules(tmp_path, mode, width, height, window, words):
    chosen = settings(mode=mode, resolution="CUSTOM", custom_width=width, custom_height=height, window=window)
    problem = preflight.custom_size_problem(chosen, 512)
    params = generation.generate_params(chosen, 1, model="m", device="cpu")
    assert (params["width"], params["height"]) == (width, height)
    if words is None:
        assert problem is None and backend_verdict(params, tmp_path) is None
        return
    assert words in problem and problem.count(". ") == 0 and not problem.endswith(".")  # one sentence
    # What the add-on refuses the backend refuses too, or it is beyond what the add-on offers (past 8192x4096).
    assert backend_verdict(params, tmp_path) is not None or "larger than SyncSphere makes" in problem


def test_a_preset_size_is_never_checked_as_a_custom_one():
    assert preflight.custom_size_problem(settings(resolution="DRAFT", custom_width=7, custom_height=3), 512) is None


def test_start_from_image_sends_the_image_and_its_strength_and_the_backend_accepts_them(tmp_path):
    start = tmp_path / "start.png"
    Image.fromarray(np.full((64, 128, 3), 90, np.uint8)).save(start)
    chosen = settings(start_image_source="FILE", start_image_path=str(start), strength=0.45)
    params = generation.generate_params(chosen, 1, model="m", device="cpu", init_image=str(start))
    assert (params["init_image"], params["strength"]) == (str(start), 0.45)
    assert backend_verdict(params, tmp_path) is None
    # Without a start image nothing of it is sent (the backend refuses a strength without an image).
    plain = generation.generate_params(chosen, 1, model="m", device="cpu")
    assert "init_image" not in plain and "strength" not in plain


def test_start_from_image_refuses_a_missing_file_and_a_remote_backend_in_one_sentence(tmp_path):
    start = tmp_path / "start.png"
    start.write_bytes(b"")
    assert preflight.start_image_problem("NONE", "", local=False) is None
    assert preflight.start_image_problem("FILE", str(start), local=True) is None
    assert preflight.start_image_problem("WORLD", "", local=True) is None  # the operator reads the World
    assert "Choose the image to start from in Image File" in preflight.start_image_problem("FILE", " ", local=True)
    missing = preflight.start_image_problem("FILE", str(tmp_path / "gone.png"), local=True)
    assert missing == f"The start image {tmp_path / 'gone.png'} does not exist; choose another in Image File"
    assert preflight.start_image_problem("WORLD", "", local=False) == preflight.NEEDS_LOCAL_BACKEND
    for sentence in (missing, preflight.NEEDS_LOCAL_BACKEND, preflight.NO_WORLD_IMAGE):
        assert sentence.count(". ") == 0 and not sentence.endswith(".")


def test_a_strength_that_leaves_no_step_is_the_backends_sentence_in_the_panels_words(tmp_path):
    start = tmp_path / "start.png"
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(start)
    chosen = settings(steps=2, strength=0.3)
    params = generation.generate_params(chosen, 1, model="m", device="cpu", init_image=str(start))
    problem = preflight.request_problem(params, str(tmp_path / "job"))
    assert problem.startswith("Strength 0.3 of 2 steps leaves no step to run; raise Advanced › Steps to at least 4")


def test_extend_photo_sends_the_photo_and_its_camera_in_world_mode_only_and_the_backend_accepts_them(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(photo)
    chosen = settings(extend_photo=True, photo_path=str(photo), photo_fov=72.5, photo_yaw=-30.0, photo_pitch=12.25)
    params = generation.generate_params(chosen, 1, model="m", device="cpu", photo=str(photo))
    assert {name: params[name] for name in ("photo", "photo_fov", "photo_yaw", "photo_pitch")} == {
        "photo": str(photo), "photo_fov": 72.5, "photo_yaw": -30.0, "photo_pitch": 12.25}
    assert backend_verdict(params, tmp_path) is None
    # The backend extends only 360° worlds: another mode sends nothing of it, and no photo sends nothing.
    for plain in (generation.generate_params(settings(mode="WIDE", extend_photo=True), 1, model="m", device="cpu",
                                             photo=str(photo)),
                  generation.generate_params(chosen, 1, model="m", device="cpu")):
        assert not any(name.startswith("photo") for name in plain)


def test_extend_photo_refuses_a_missing_file_and_a_remote_backend_and_speaks_the_panels_words(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(photo)
    assert preflight.photo_problem(False, "WORLD", "", local=False) is None
    assert preflight.photo_problem(True, "TILE", "", local=False) is None  # nothing of it is sent there
    assert preflight.photo_problem(True, "WORLD", str(photo), local=True) is None
    assert preflight.photo_problem(True, "WORLD", str(photo), local=False) == preflight.PHOTO_NEEDS_LOCAL_BACKEND
    assert "Choose the photo to extend in Photo File" in preflight.photo_problem(True, "WORLD", " ", local=True)
    missing = preflight.photo_problem(True, "WORLD", str(tmp_path / "gone.png"), local=True)
    assert missing == f"The photo {tmp_path / 'gone.png'} does not exist; choose another in Photo File"
    # The backend's refusal of a photo with SyncSDE names the panel's controls, not flags.
    chosen = settings(extend_photo=True, photo_path=str(photo), sync_method="SYNCSDE")
    params = generation.generate_params(chosen, 1, model="m", device="cpu", photo=str(photo))
    problem = preflight.request_problem(params, str(tmp_path / "job"))
    assert problem.startswith("Photo File cannot go with Advanced › Synchronisation: SyncSDE") and "--" not in problem


@pytest.mark.parametrize("mode, size", [("WORLD", (256, 128)), ("WIDE", (300, 100)), ("TILE", (128, 128))])
@pytest.mark.parametrize("scale", [2, 4])
def test_upscaling_a_history_item_is_what_the_backends_upscale_command_does(tmp_path, mode, size, scale):
    """The params of Upscale x2 / x4 ask the backend for the canvas, start image and strength that
    ``python -m backend upscale PANORAMA --scale S`` asks for, with the item's own prompt, seed and settings."""
    from backend.app.cli import build_parser, upscale_request

    folder = tmp_path / "item"
    folder.mkdir()
    png = folder / "panorama.png"
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(png)
    assert image_input.png_size(str(png)) == size
    values = dict(vars(settings(mode=mode, steps=2)), seed=77)
    run = types.SimpleNamespace(window=16, stride=8, memory="low", quantize="int8")
    params = image_input.upscale_params(values, str(png), size, scale, run, model="m", device="cpu")
    assert params["quantize"] == "int8"
    assert (params["init_image"], params["strength"], params["seed"]) == (str(png), 0.3, 77)
    assert params["steps"] == 4  # raised so 0.3 of them leaves a step (int(4 x 0.3) = 1)
    assert (params["window"], params["stride"], params["memory"]) == (16, 8, "low")
    layout = generation.LAYOUT_OF_MODE[mode]
    command = upscale_request(build_parser().parse_args(
        ["upscale", str(png), "--scale", str(scale), "--out", str(tmp_path / "out"), "--layout", layout]))
    assert (params["width"], params["height"], params["layout"]) == (command.width, command.height, command.layout)
    assert params["prompt"] == "a harbour at dusk" and params["negative_prompt"] == "fog"
    assert backend_verdict(params, tmp_path, ModelGeometry(8, 4, 32)) is None
    if mode == "WORLD":
        assert params["width"] == 2 * params["height"]


def test_an_upscale_past_8k_or_of_a_missing_image_is_refused_in_one_sentence(tmp_path):
    assert preflight.upscale_problem("p.png", (2048, 1024), 4, local=True) is None  # 8192x4096: the limit
    too_large = preflight.upscale_problem("p.png", (4096, 2048), 4, local=True)
    assert "The upscaled image would be 16384x8192 px, larger than the 8192x4096 px" in too_large
    gone = preflight.upscale_problem(str(tmp_path / "gone.png"), image_input.png_size(str(tmp_path / "gone.png")),
                                     2, local=True)
    assert gone.startswith("The image of this generation is gone or unreadable")
    assert preflight.upscale_problem("p.png", (512, 256), 2, local=False) == preflight.NEEDS_LOCAL_BACKEND
    not_png = tmp_path / "not.png"
    not_png.write_bytes(b"GIF89a" + bytes(40))
    assert image_input.png_size(str(not_png)) is None
