"""SDXL through the one denoiser: a tiny random SDXL (two text encoders, pooled embedding and time ids through the
UNet's "text_time" embedding) built here and saved as a diffusers folder, no network."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from backend.app.job import check_request, run_job
from backend.engine.models import ModelCache
from backend.request import GenerateRequest
from model_factory import save_random_sdxl_model


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    """Path of a tiny random SDXL model (VAE factor 8, SDXL's latent scale, UNet sample size 16)."""
    return save_random_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def models():
    return ModelCache()  # one load of the tiny SDXL for the module's jobs


@pytest.mark.parametrize("negative", ["blurry", None], ids=["negative prompt", "zeros for no negative prompt"])
def test_a_single_window_canvas_matches_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path, negative):
    # One view covering the whole canvas: our conditioning per view is the pipeline's for the whole image.
    size, steps, seed, prompt = 128, 3, 1234, "a mountain lake at dawn"
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images[0]

    request = GenerateRequest(prompt=prompt, negative_prompt=negative or "", layout="wide", width=size, height=size,
                              steps=steps, guidance=7.5, seed=seed, model=tiny_sdxl, device="cpu",
                              out=str(tmp_path / "ours"))
    outputs = run_job(check_request(request))
    ours = np.asarray(Image.open(outputs["png"])).astype(np.float32) / 255.0

    assert ours.shape == expected.shape == (size, size, 3)
    difference = np.abs(ours - expected)
    # The PNG is quantised to 1/255, so the reference's float image differs by up to half a level for free.
    assert difference.max() <= 2 / 255, f"max difference {difference.max() * 255:.2f}/255"
    assert expected.std() > 0.01  # not vacuous: the image is not flat
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["params"]["window"] == 16 and metadata["views"] == 1


# 384 x 192 px equirect: 48 x 24 latents, tall enough for band+poles' row of 16-latent windows within ±60°.
WORLD = dict(layout="equirect", width=384, height=192)
SYNCDIFFUSION = dict(sync="syncdiffusion", sync_steps=2, sync_loss="lpips-alex", sync_loss_backbone="random")


@pytest.mark.parametrize("settings", [
    dict(WORLD, prompt_up="clouds", prompt_down="grass"),
    dict(layout="wide", width=384, height=128),
    dict(layout="tile", width=128, height=128),
    dict(WORLD, **SYNCDIFFUSION),
    dict(WORLD, mad_steps=2),
    dict(layout="wide", width=256, height=128, sync="syncsde"),
    dict(WORLD, schedule="shifted", prompt_up="clouds"),
], ids=["equirect-band+poles-prompt-up-down", "wide", "tile", "syncdiffusion", "mad", "syncsde", "shifted"])
def test_every_layout_and_method_runs_on_sdxl(tiny_sdxl, models, tmp_path, settings):
    torch.manual_seed(0)  # SyncDiffusion's random LPIPS trunk (pnet_rand) is drawn from torch's global generator
    request = GenerateRequest(prompt="a canyon", steps=2, seed=3, model=tiny_sdxl, device="cpu",
                              out=str(tmp_path / "out"), **settings)
    outputs = run_job(check_request(request), models=models)
    image = np.asarray(Image.open(outputs["png"]))
    assert image.shape == (settings["height"], settings["width"], 3) and image.std() > 1
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["params"]["window"] == 16
    layout = settings["layout"]
    if layout == "equirect":
        assert metadata["view_set"] == "band+poles" and set(outputs["faces"]) == set("FRBLUD")
        assert all(os.path.isfile(path) for path in (outputs["exr_sky"], outputs["lighting"]))
    if "prompt_up" in settings:
        assert "clouds" in metadata["view_prompts"]["U"]
    if "prompt_down" in settings:
        assert "grass" in metadata["view_prompts"]["D"]
    if settings.get("sync") == "syncdiffusion":
        assert metadata["syncdiffusion"]["guided_steps"] == 2 and not metadata["syncdiffusion"]["loss_pretrained"]
    if settings.get("sync") == "syncsde":
        assert metadata["syncsde"]["conditioned_views"] > 0
    if "mad_steps" in settings:
        assert metadata["mad"]["steps"] == 2
    expected_schedule = settings.get("schedule") or ("shifted" if layout == "tile" else "dense")
    assert metadata["schedule"] == expected_schedule
    if settings.get("sync") == "syncsde":  # every view keeps its own state, pulled towards its neighbours
        assert metadata["fusion"] == "own"
    elif expected_schedule == "dense":  # MultiDiffusion's fusion of crop windows, SyncTweedies' with projected views
        assert metadata["fusion"] == {"equirect": "clean", "wide": "noisy"}[layout]


def test_mad_merges_attention_in_sdxl_blocks(tiny_sdxl, models, tmp_path):
    # The same world with and without merged attention: SDXL's transformer blocks (two layers in the deeper one,
    # linear projections) run MAD's processors, and the image changes.
    images = {}
    for mad_steps in (0, 2):
        request = GenerateRequest(prompt="a canyon", steps=2, seed=3, model=tiny_sdxl, device="cpu", mad_steps=mad_steps,
                                  out=str(tmp_path / f"mad{mad_steps}"), **WORLD)
        outputs = run_job(check_request(request), models=models)
        images[mad_steps] = np.asarray(Image.open(outputs["png"])).astype(int)
    assert json.loads(open(outputs["metadata"]).read())["mad"]["blocks"] == ["down", "mid", "up"]
    assert np.abs(images[2] - images[0]).max() > 2


def test_models_list_reports_the_sdxl_family(tiny_sdxl, capsys):
    from backend.app.cli import main

    assert main(["models", "list", "--folder", os.path.dirname(tiny_sdxl), "--json"]) == 0
    listed = {model["id"]: model for model in json.loads(capsys.readouterr().out)}
    model = listed[tiny_sdxl]
    assert (model["family"], model["architecture"], model["kind"], model["complete"]) == ("SDXL", "SDXL", "folder", True)
