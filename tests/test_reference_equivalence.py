"""Our MultiDiffusion on a wide canvas reproduces diffusers' StableDiffusionPanoramaPipeline."""

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

from backend.app.job import check_request, run_job
from backend.request import GenerateRequest
from PIL import Image


def test_wide_canvas_matches_diffusers_panorama_pipeline(tiny_model, tmp_path):
    # Latent width 80 = window 64 + 2 strides of 8: the case where diffusers covers every column.
    width, height, steps, seed = 640, 512, 4, 1234
    prompt, negative = "a mountain lake at dawn", "blurry"
    reference = StableDiffusionPanoramaPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
        guidance_scale=7.5, view_batch_size=2, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images[0]

    request = GenerateRequest(
        prompt=prompt, negative_prompt=negative, layout="wide", width=width, height=height, steps=steps,
        guidance=7.5, seed=seed, window=64, stride=8, view_batch=3, model=tiny_model, device="cpu",
        out=str(tmp_path / "ours"),
    )
    outputs = run_job(check_request(request))
    ours = np.asarray(Image.open(outputs["png"])).astype(np.float32) / 255.0

    assert ours.shape == expected.shape == (height, width, 3)
    difference = np.abs(ours - expected)
    # The PNG is quantised to 1/255, so the reference's float image differs by up to half a level for free.
    assert difference.max() <= 2 / 255, f"max difference {difference.max() * 255:.2f}/255"
    # And the comparison is not vacuous: the image is not flat.
    assert expected.std() > 0.01
