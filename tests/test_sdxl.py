"""SDXL through the one denoiser: a tiny random SDXL (two text encoders, pooled embedding and time ids through the
UNet's "text_time" embedding) built here and saved as a diffusers folder, no network."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from backend.app.job import check_request, run_job
from backend.request import GenerateRequest
from model_factory import save_random_sdxl_model


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    """Path of a tiny random SDXL model (VAE factor 8, SDXL's latent scale, UNet sample size 16)."""
    return save_random_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


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
