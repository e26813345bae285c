"""SyncDiffusion's gradient step: batched equals per-view, the anchor never moves, w = 0 is MultiDiffusion."""

import lpips
import pytest
import torch

from backend.canvas import Canvas
from backend.denoiser import GuidedUNetDenoiser
from backend.job import ModelCache, check_request, initial_noise, make_scheduler
from backend.request import GenerateRequest
from backend.sampler import sample_canvas
from backend.sync.syncdiffusion import SyncDiffusionGuidance, anchor_view_index


@pytest.fixture(scope="module")
def parts(tiny_model):
    model = ModelCache().get(check_request(GenerateRequest(prompt="a canyon", model=tiny_model, device="cpu", out="/unused")))
    pipeline = model.pipeline
    embeds, negative = pipeline.encode_prompt("a canyon", model.device, 1, True, None)
    denoiser = GuidedUNetDenoiser(pipeline.unet, embeds, negative, 7.5)
    torch.manual_seed(0)  # LPIPS with a random backbone (no download): repeatable after the seed
    perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    for parameter in perceptual.parameters():
        parameter.requires_grad_(False)
    vae = pipeline.vae

    def decode(latents):
        return vae.decode(latents / vae.config.scaling_factor).sample

    return model, denoiser, decode, perceptual


def guidance(parts, **settings):
    _, denoiser, decode, perceptual = parts
    return SyncDiffusionGuidance(predict=denoiser.predict, decode=decode, loss=perceptual, **settings)


def test_batched_gradient_equals_each_views_own_gradient(parts):
    model = parts[0]
    scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[2]
    latents = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    guide = guidance(parts, anchor=2)
    anchor_image = parts[2](latents[2:3])  # any fixed image serves for the comparison
    batched = guide.gradient(latents[[0, 1, 3, 4]], anchor_image, timestep, scheduler)
    scale = batched.abs().max().item()
    assert scale > 0  # the loss really depends on x_t
    for row, index in enumerate([0, 1, 3, 4]):
        alone = guide.gradient(latents[index : index + 1], anchor_image, timestep, scheduler)
        # Equal up to float32 summation order in batched convolutions: measured at most 5e-4 of the
        # largest gradient entry. Another view's gradient differs by the order of the gradient itself.
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=2e-3 * scale)
        assert (batched[(row + 1) % 4] - alone[0]).abs().max() > 0.1 * scale


def test_the_anchor_never_moves_and_the_others_do(parts):
    model = parts[0]
    scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    guided = guidance(parts, anchor=1, chunk=2).guide(latents, scheduler.timesteps[0], scheduler, 0)
    assert torch.equal(guided[1], latents[1])
    assert all((guided[index] - latents[index]).abs().max() > 0 for index in (0, 2, 3))


def test_weight_zero_is_multidiffusion_bit_for_bit(parts):
    model, denoiser = parts[0], parts[1]
    canvas = Canvas("equirect", 16, 32)
    views = canvas.crop_views(16, 8)
    noise = initial_noise(3, (1, 4, 16, 32), model.device, model.dtype)
    results = []
    for guide in (None, guidance(parts, weight=0.0, anchor=anchor_view_index(canvas, views))):
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        results.append(sample_canvas(denoiser, scheduler, canvas, views, noise, 3, 2, guidance=guide))
    assert torch.equal(results[0], results[1])


def test_decay_steps_and_every_choose_the_guided_steps():
    guide = SyncDiffusionGuidance(predict=None, decode=None, loss=None, weight=20.0, decay=0.5, steps=6, every=2)
    assert [guide.weight_at(step) for step in range(8)] == [20.0, 0.0, 5.0, 0.0, 1.25, 0.0, 0.0, 0.0]


def test_default_anchor_faces_longitude_zero_on_equirect():
    canvas = Canvas("equirect", 8, 64)
    views = canvas.crop_views(8, 4)
    anchor = views[anchor_view_index(canvas, views)]
    assert anchor.left + anchor.width / 2 == 32  # the centre column: longitude 0
