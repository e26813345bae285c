"""Wrapping canvases have no seam: equirect wraps in x, tile in x and y.

Random tiny models decode to near-white noise with dark borders, so an image statistic alone can pass
without any wrap (a planar canvas passes the seam statistic below too). The proof that no column is
special is shift equivariance: circularly shifting the initial noise by whole strides shifts the result
by the same amount, which a planar canvas fails by a wide margin (the negative control).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from backend.sphere.canvas import Canvas
from backend.engine.decode import decode_canvas
from backend.app.job import check_request, run_job
from backend.engine.generation import initial_noise, make_scheduler
from backend.analysis.metrics import seam_ratio
from backend.request import GenerateRequest
from backend.engine.sampler import sample_canvas
from backend.sphere.view_sets import CanvasViews

WINDOW, STRIDE, STEPS = 16, 8, 5


@pytest.mark.parametrize("layout,width,height,axes", [("equirect", 512, 256, [1]), ("tile", 256, 256, [1, 0])])
def test_wrapped_edges_differ_no_more_than_neighbouring_lines(tiny_model, tmp_path, layout, width, height, axes):
    request = GenerateRequest(prompt="a pine forest", layout=layout, width=width, height=height, steps=STEPS, seed=3,
                              window=WINDOW, stride=STRIDE, model=tiny_model, device="cpu", out=str(tmp_path))
    image = np.asarray(Image.open(run_job(check_request(request))["png"]))
    for axis in axes:
        assert seam_ratio(image, axis) <= 1.2


def _sample_shifted(denoiser, model, kind, height, width, shift):
    canvas = Canvas(kind, height, width)
    views = CanvasViews(canvas, canvas.crop_views(WINDOW, STRIDE))
    noise = initial_noise(7, (1, 4, height, width), model.device, model.dtype)
    results = []
    for initial in (noise, torch.roll(noise, shift, dims=(2, 3))):
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        results.append(sample_canvas(denoiser, scheduler, views, initial, steps=STEPS, view_batch=4))
    return canvas, results


@pytest.mark.parametrize("kind,height,width,shift", [("equirect", 32, 64, (0, 24)), ("tile", 32, 32, (8, 16))])
def test_shifting_the_noise_by_whole_strides_shifts_the_result(denoiser_and_model, kind, height, width, shift):
    denoiser, model = denoiser_and_model
    canvas, (plain, shifted) = _sample_shifted(denoiser, model, kind, height, width, shift)
    # Latents: the same computation in another order, so equal up to float summation order.
    torch.testing.assert_close(torch.roll(plain, shift, dims=(2, 3)), shifted, atol=1e-4, rtol=1e-4)
    # Images: the decoder sees slightly different zero-padded context, so close but not bit-equal.
    factor = model.geometry.vae_scale_factor
    images = [decode_canvas(model.pipeline.vae, latent, canvas) for latent in (plain, shifted)]
    difference = (torch.roll(images[0], (shift[0] * factor, shift[1] * factor), dims=(2, 3)) - images[1]).abs()
    assert difference.max() < 0.1 and difference.mean() < 0.01


def test_planar_canvas_is_not_shift_equivariant(denoiser_and_model):
    """Negative control: the same check on a wide canvas fails, so the check can fail."""
    denoiser, model = denoiser_and_model
    _, (plain, shifted) = _sample_shifted(denoiser, model, "wide", 32, 64, (0, 24))
    assert (torch.roll(plain, (0, 24), dims=(2, 3)) - shifted).abs().max() > 0.5
