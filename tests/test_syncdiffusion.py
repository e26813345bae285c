"""SyncDiffusion: the gradient step (batched = per-view, anchor fixed, w = 0 is MultiDiffusion), the
predicted clean latent, coherence on tiny models, which steps are guided, and the opt-in fast paths."""

import json

import numpy as np
import pytest
import torch
from model_factory import save_random_tiny_autoencoder
from PIL import Image

from backend.sphere.canvas import Canvas
from backend.app.cli import main
from backend.engine.decode import decode_canvas
from backend.engine.denoiser import GuidedUNetDenoiser
from backend.engine.models import ModelCache
from backend.app.job import check_request, run_job
from backend.engine.generation import gradient_checkpointing, initial_noise, make_scheduler
from backend.analysis.metrics import intra_lpips, non_overlapping_crops
from backend.engine.perceptual import load_perceptual_loss
from backend.request import GenerateRequest
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.engine.sync.syncdiffusion import SyncDiffusionGuidance, anchor_view_index, ring_anchor_indices
from backend.engine.sync.tweedie import predicted_clean_latent
from backend.sphere.view_sets import CanvasViews


@pytest.fixture(scope="module")
def models():
    return ModelCache()


@pytest.fixture(scope="module")
def parts(tiny_model, models):
    model = models.get(check_request(GenerateRequest(prompt="a canyon", model=tiny_model, device="cpu", out="/unused")))
    pipeline = model.pipeline
    embeds, negative = pipeline.encode_prompt("a canyon", model.device, 1, True, None)
    denoiser = GuidedUNetDenoiser(pipeline.unet, embeds, negative, 7.5)
    perceptual = load_perceptual_loss("lpips-vgg", backbone="random")
    vae = pipeline.vae

    def decode(latents):
        return vae.decode(latents / vae.config.scaling_factor).sample

    return model, denoiser, decode, perceptual


def guidance(parts, **settings):
    _, denoiser, decode, perceptual = parts
    return SyncDiffusionGuidance(predict=denoiser.predict, decode=decode, loss=perceptual, **settings)


def ddim(model, steps=10):
    scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def test_batched_gradient_equals_each_views_own_gradient(parts):
    model = parts[0]
    scheduler = ddim(model)
    timestep = scheduler.timesteps[2]
    latents = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    guide = guidance(parts, anchors=[2] * 5)
    anchor_image = parts[2](latents[2:3])  # any fixed image serves for the comparison
    batched, _ = guide.gradient(latents[[0, 1, 3, 4]], None, anchor_image, timestep, scheduler)
    scale = batched.abs().max().item()
    assert scale > 0  # the loss really depends on x_t
    for row, index in enumerate([0, 1, 3, 4]):
        alone, _ = guide.gradient(latents[index : index + 1], None, anchor_image, timestep, scheduler)
        # Equal up to float32 summation order in batched convolutions: measured at most 1.7e-3 of the
        # largest gradient entry. Another view's gradient differs by the order of the gradient itself.
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=2e-3 * scale)
        assert (batched[(row + 1) % 4] - alone[0]).abs().max() > 0.1 * scale


def test_the_anchor_never_moves_and_the_others_do(parts):
    scheduler = ddim(parts[0])
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    guided, predictions = guidance(parts, anchors=[1] * 4, chunk=2).guide(latents, scheduler.timesteps[0], scheduler, 0)
    assert predictions is None  # the paper's algorithm predicts again at the updated latents
    assert torch.equal(guided[1], latents[1])
    assert all((guided[index] - latents[index]).abs().max() > 0 for index in (0, 2, 3))


def test_weight_zero_is_multidiffusion_bit_for_bit(parts):
    model, denoiser = parts[0], parts[1]
    canvas = Canvas("equirect", 16, 32)
    views = CanvasViews(canvas, canvas.crop_views(16, 8))
    noise = initial_noise(3, (1, 4, 16, 32), model.device, model.dtype)
    results = []
    for guide in (None, guidance(parts, weight=0.0, anchors=[anchor_view_index(canvas, views.crops)] * len(views))):
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        results.append(sample_canvas(denoiser, scheduler, views, noise, steps=3, view_batch=2,
                                     sync=Synchronisation(guidance=guide)))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name,prediction_type", [("ddim", "epsilon"), ("ddim", "v_prediction"), ("euler", "epsilon"), ("euler", "v_prediction")])
def test_predicted_clean_latent_is_the_schedulers_own(parts, name, prediction_type):
    model = parts[0]
    scheduler = make_scheduler(name, {**model.pipeline.scheduler.config, "prediction_type": prediction_type})
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps[:3]:
        scheduler.scale_model_input(latents, timestep)  # sets a k-diffusion scheduler's step index
        prediction = torch.randn(2, 4, 8, 8, generator=generator)
        ours = predicted_clean_latent(scheduler, latents, prediction, timestep)
        step = scheduler.step(prediction, timestep, latents)
        torch.testing.assert_close(ours, step.pred_original_sample)
        latents = step.prev_sample


def test_decay_steps_and_every_choose_the_guided_steps():
    guide = SyncDiffusionGuidance(predict=None, decode=None, loss=None, anchors=[0], weight=20.0, decay=0.5, steps=6, every=2)
    assert [guide.weight_at(step) for step in range(8)] == [20.0, 0.0, 5.0, 0.0, 1.25, 0.0, 0.0, 0.0]


def test_default_anchor_faces_longitude_zero_on_equirect():
    canvas = Canvas("equirect", 8, 64)
    views = canvas.crop_views(8, 4)
    anchor = views[anchor_view_index(canvas, views)]
    assert anchor.left + anchor.width / 2 == 32  # the centre column: longitude 0


def test_each_equirect_ring_has_its_own_anchor_facing_longitude_zero():
    canvas = Canvas("equirect", 16, 64)  # three rows of 8-latent views at stride 4
    views = canvas.crop_views(8, 4)
    anchors = ring_anchor_indices(CanvasViews(canvas, views))
    assert len(set(anchors)) == 3
    for index, anchor in enumerate(anchors):
        assert views[anchor].top == views[index].top  # same latitude
        assert views[anchor].left + views[anchor].width / 2 == 32  # longitude 0
        assert anchors[anchor] == anchor
    wide = Canvas("wide", 16, 64)
    wide_views = wide.crop_views(8, 4)
    assert set(ring_anchor_indices(CanvasViews(wide, wide_views))) == {anchor_view_index(wide, wide_views)}


def test_views_are_pulled_towards_their_own_rings_anchor(parts):
    scheduler = ddim(parts[0])
    timestep = scheduler.timesteps[1]
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    anchor_of = [0, 0, 2, 2]  # two rings: views 0-1 and 2-3
    guided, _ = guidance(parts, anchors=anchor_of, weight=1.0, decay=1.0).guide(latents, timestep, scheduler, 0)
    assert torch.equal(guided[0], latents[0]) and torch.equal(guided[2], latents[2])
    for view, anchor in ((1, 0), (3, 2)):
        alone, _ = guidance(parts, anchors=[0, 0], weight=1.0, decay=1.0).guide(latents[[anchor, view]], timestep, scheduler, 0)
        torch.testing.assert_close(guided[view], alone[1], rtol=0, atol=2e-3 * (alone[1] - latents[view]).abs().max().item())


class UNetCalls:
    """Counts UNet forward calls made with and without autograd (gradient passes vs plain predictions)."""

    def __init__(self, unet):
        self.with_grad = self.without_grad = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1


def _run(tiny_model, models, tmp_path, name, **settings):
    request = GenerateRequest(
        prompt="a canyon", layout="wide", width=256, height=64, window=8, stride=4, steps=6, seed=5,
        model=tiny_model, device="cpu", out=str(tmp_path / name), **settings,
    )
    outputs = run_job(check_request(request), models=models)
    return outputs, json.load(open(outputs["metadata"]))


@pytest.mark.parametrize("steps,every,guided", [(None, 1, [0, 1, 2, 3, 4, 5]), (3, 1, [0, 1, 2]), (None, 2, [0, 2, 4]), (5, 3, [0, 3])])
def test_sync_steps_and_every_guide_exactly_the_steps_they_say(tiny_model, models, tmp_path, parts, steps, every, guided):
    # wide 256x64 px, window 8, stride 4: 7 views, 6 others than the anchor, in gradient chunks of 4 (view batch).
    calls = UNetCalls(parts[0].pipeline.unet)
    try:
        _, metadata = _run(tiny_model, models, tmp_path, "run", sync="syncdiffusion", sync_steps=steps, sync_every=every,
                           sync_loss="lpips-alex", sync_loss_backbone="random")
    finally:
        calls.handle.remove()
    assert metadata["syncdiffusion"]["guided_steps"] == len(guided)
    assert calls.with_grad == 2 * len(guided)  # two chunks of others per guided step
    # Every step predicts all views (2 batches of at most 4), and each guided step predicts its anchor once more.
    assert calls.without_grad == 2 * 6 + len(guided)


def test_reuse_eps_skips_the_second_prediction(tiny_model, models, tmp_path, parts):
    calls = UNetCalls(parts[0].pipeline.unet)
    try:
        outputs, metadata = _run(tiny_model, models, tmp_path, "reuse", sync="syncdiffusion", sync_steps=2,
                                 sync_loss="lpips-alex", sync_loss_backbone="random", sync_reuse_eps=True)
    finally:
        calls.handle.remove()
    assert calls.with_grad == 2 * 2
    assert calls.without_grad == 2 * (6 - 2) + 2  # guided steps: only the anchor's prediction, no second pass
    exact, _ = _run(tiny_model, models, tmp_path, "exact", sync="syncdiffusion", sync_steps=2,
                    sync_loss="lpips-alex", sync_loss_backbone="random")
    assert not np.array_equal(np.asarray(Image.open(outputs["png"])), np.asarray(Image.open(exact["png"])))


def test_gradient_checkpointing_gives_the_same_gradient_and_is_switched_off_after(parts):
    model = parts[0]
    unet, vae = model.pipeline.unet, model.pipeline.vae
    scheduler = ddim(model)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    guide = guidance(parts, anchors=[0] * 3)
    anchor_image = parts[2](latents[:1])
    plain, _ = guide.gradient(latents[1:], None, anchor_image, scheduler.timesteps[1], scheduler)
    with gradient_checkpointing([unet, vae]):
        assert unet.is_gradient_checkpointing and vae.is_gradient_checkpointing
        checkpointed, _ = guide.gradient(latents[1:], None, anchor_image, scheduler.timesteps[1], scheduler)
    assert not unet.is_gradient_checkpointing and not vae.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6 * plain.abs().max().item())


def test_tiny_autoencoder_decodes_the_guidance_only(tiny_model, models, tmp_path):
    taesd = save_random_tiny_autoencoder(str(tmp_path / "taesd"))
    settings = dict(sync="syncdiffusion", sync_steps=2, sync_loss="lpips-alex", sync_loss_backbone="random", sync_weight=200.0)
    fast, metadata = _run(tiny_model, models, tmp_path, "taesd", sync_decoder=taesd, **settings)
    exact, _ = _run(tiny_model, models, tmp_path, "vae", **settings)
    assert metadata["syncdiffusion"]["decoder"] == taesd
    assert not np.array_equal(np.asarray(Image.open(fast["png"])), np.asarray(Image.open(exact["png"])))


def test_loss_size_resizes_both_images_before_the_loss():
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    targets = torch.rand(2, 3, 64, 96) * 2 - 1
    full = load_perceptual_loss("lpips-alex", backbone="random")
    small = load_perceptual_loss("lpips-alex", backbone="random", size=32)

    def resize(x):
        return torch.nn.functional.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)

    torch.testing.assert_close(small(images, targets), full(resize(images), resize(targets)))
    assert not torch.allclose(small(images, targets), full(images, targets))


def test_guidance_lowers_intra_lpips_against_multidiffusion_over_five_seeds(tiny_model, models, tmp_path):
    # Intra-LPIPS measured with the same loss network as the guidance (AlexNet LPIPS, random trunk):
    # four 64 px crops of a 256x64 wide image, six pairs. Measured: 0.103 (w = 0) vs 0.098 (w = 20),
    # lower for each of the five seeds.
    loss = load_perceptual_loss("lpips-alex", backbone="random")
    scores = {"multidiffusion": [], "syncdiffusion": []}
    for seed in range(5):
        for sync in scores:
            settings = dict(sync_weight=20.0, sync_loss="lpips-alex", sync_loss_backbone="random") if sync == "syncdiffusion" else {}
            request = GenerateRequest(
                prompt="a canyon", layout="wide", width=256, height=64, window=8, stride=4, steps=4, seed=seed,
                model=tiny_model, device="cpu", out=str(tmp_path / f"{sync}-{seed}"), sync=sync, **settings,
            )
            image = np.asarray(Image.open(run_job(check_request(request), models=models)["png"]))
            scores[sync].append(intra_lpips(non_overlapping_crops(image, 64), loss))
    assert np.mean(scores["syncdiffusion"]) < np.mean(scores["multidiffusion"])


def test_style_loss_guidance_runs_with_the_supplementarys_weight(tiny_model, models, tmp_path, parts):
    _, metadata = _run(tiny_model, models, tmp_path, "style", sync="syncdiffusion", sync_loss="style",
                       sync_loss_backbone="random", sync_steps=1)
    assert metadata["params"]["sync_weight"] == 0.1
    assert metadata["syncdiffusion"]["loss_backbone"].startswith("vgg19 random")
    # The style loss (x 10^6, as the job scales it) really moves the views at that weight.
    _, denoiser, decode, _ = parts
    style = load_perceptual_loss("style", backbone="random", scale=1e6)
    scheduler = ddim(parts[0])
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    guide = SyncDiffusionGuidance(predict=denoiser.predict, decode=decode, loss=style, anchors=[0] * 3, weight=0.1)
    guided, _ = guide.guide(latents, scheduler.timesteps[0], scheduler, 0)
    assert all((guided[index] - latents[index]).abs().max() > 0 for index in (1, 2))


BAD_SYNC_FLAGS = {
    "unknown method": (["--sync", "syncfusion"], "--sync"),
    "negative weight": (["--sync", "syncdiffusion", "--sync-weight", "-1"], "--sync-weight"),
    "decay zero": (["--sync", "syncdiffusion", "--sync-decay", "0"], "--sync-decay"),
    "decay above one": (["--sync", "syncdiffusion", "--sync-decay", "1.5"], "--sync-decay"),
    "negative steps": (["--sync", "syncdiffusion", "--sync-steps", "-1"], "--sync-steps"),
    "every zero": (["--sync", "syncdiffusion", "--sync-every", "0"], "--sync-every"),
    "anchor word": (["--sync", "syncdiffusion", "--sync-anchor", "left"], "--sync-anchor"),
    "anchor past the views": (["--sync", "syncdiffusion", "--sync-anchor", "99"], "--sync-anchor"),
    "unknown loss": (["--sync", "syncdiffusion", "--sync-loss", "ssim"], "--sync-loss"),
    "unknown backbone": (["--sync", "syncdiffusion", "--sync-loss-backbone", "imagenet"], "--sync-loss-backbone"),
    "tiny loss size": (["--sync", "syncdiffusion", "--sync-loss-size", "4"], "--sync-loss-size"),
    "option without syncdiffusion": (["--sync-weight", "10"], "--sync-weight"),
    "decoder not found": (["--sync", "syncdiffusion", "--sync-decoder", "/no/such/taesd"], "/no/such/taesd"),
    "pretrained trunk offline": (["--sync", "syncdiffusion", "--sync-loss-backbone", "pretrained"], "HF_HUB_OFFLINE"),
}


@pytest.mark.parametrize("case", sorted(BAD_SYNC_FLAGS))
def test_bad_sync_flags_are_one_sentence_and_exit_2(tiny_model, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached ImageNet trunk
    flags, named = BAD_SYNC_FLAGS[case]
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "wide",
                 "--width", "256", "--height", "64", "--window", "8", "--stride", "4", "--steps", "1",
                 "--device", "cpu", *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("error: ") and error.endswith(".") and named in error
    assert not (out / "panorama.png").exists()
