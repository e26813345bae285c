"""Stable Diffusion 3 through the one denoiser: a tiny random SD3 (an MMDiT on 16-channel latents in 2x2 patches, two
CLIP encoders with projections, T5 or none, the flow-matching Euler sampler with shift 3) built here, no network."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image

from backend.app.cli import main
from backend.app.job import check_request, run_job
from backend.engine.flow_matching import FlowMatchingSampler, make_flow_matching_sampler
from backend.engine.models import ModelCache
from backend.analysis.metrics import seam_ratio
from backend.engine.denoiser import GuidedSD3TransformerDenoiser
from backend.engine.generation import initial_noise
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.engine.sync import mad as mad_module
from backend.engine.sync.mad import MergedAttention, block_divisors, merge_views, transformer_block_groups
from backend.engine.sync.syncsde import SyncSDE, score_step_gain
from backend.engine.sync.tweedie import predicted_clean_latent, prediction_for_clean_latent
from backend.sphere.canvas import Canvas, CropView
from backend.sphere.view_sets import CanvasViews, canvas_views
from backend.errors import BadRequest
from backend.request import GenerateRequest
from model_factory import SD3_SCHEDULER, TINY_SD3_TRANSFORMER, TINY_T5, save_random_sd3_model


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> str:
    """Path of a tiny random SD3 model (VAE factor 8, 16 latent channels, transformer sample size 16, patch 2)."""
    return save_random_sd3_model(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


@pytest.fixture(scope="module")
def tiny_sd3_with_t5(tmp_path_factory) -> str:
    """Path of the tiny SD3 with a tiny T5 encoder (``TINY_T5``) as its third text encoder."""
    return save_random_sd3_model(str(tmp_path_factory.mktemp("models") / "tiny-sd3-t5"), t5_config=TINY_T5)


@pytest.fixture(scope="module")
def models():
    return ModelCache()  # one load of the tiny SD3 for the module's jobs


@pytest.mark.parametrize("negative,with_t5", [("blurry", False), (None, False), ("blurry", True)],
                         ids=["negative prompt", "empty negative prompt", "with T5"])
def test_a_single_window_canvas_matches_diffusers_sd3_pipeline(request, models, tmp_path, negative, with_t5):
    # One view covering the whole canvas: its conditioning, positions, velocity, σ schedule and decode are the
    # pipeline's for the whole image.
    size, steps, seed, prompt = 128, 4, 1234, "a mountain lake at dawn"
    tiny_sd3 = request.getfixturevalue("tiny_sd3_with_t5" if with_t5 else "tiny_sd3")
    absent = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **absent)
    assert (reference.text_encoder_3 is not None) == with_t5
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps, guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images[0]

    job = GenerateRequest(prompt=prompt, negative_prompt=negative or "", layout="wide", width=size, height=size,
                          steps=steps, guidance=6.0, seed=seed, model=tiny_sd3, device="cpu", out=str(tmp_path / "ours"))
    checked = check_request(job)
    outputs = run_job(checked, models=models)
    assert (models.get(checked).pipeline.text_encoder_3 is not None) == with_t5  # T5 loads where the model has it
    ours = np.asarray(Image.open(outputs["png"])).astype(np.float32) / 255.0

    assert ours.shape == expected.shape == (size, size, 3)
    difference = np.abs(ours - expected)
    # The PNG is quantised to 1/255, so the reference's float image differs by up to half a level for free.
    assert difference.max() <= 2 / 255, f"max difference {difference.max() * 255:.2f}/255"
    assert expected.std() > 0.01  # not vacuous: the image is not flat
    metadata = json.loads(open(outputs["metadata"]).read())
    assert metadata["params"]["window"] == 16 and metadata["views"] == 1
    assert metadata["scheduler"] == "FlowMatchingSampler" and metadata["unet_rows"] == 2 * steps


def test_x0_from_the_velocity_and_its_inverse_match_the_flow_matching_scheduler():
    # Latents on the flow path (scale_noise: (1 - σ) x0 + σ ε) and the velocity ε - x0 give back x0 at every step
    # of the shifted σ schedule; the inverse gives back the velocity; and stepping with the velocity that predicts
    # a chosen x0 lands where the scheduler's own path through that x0 and the same noise lies.
    generator = torch.Generator().manual_seed(0)
    clean, noise, target = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(3))
    sampler = FlowMatchingSampler(**SD3_SCHEDULER)
    reference = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    sampler.set_timesteps(6)
    reference.set_timesteps(6)
    torch.testing.assert_close(sampler.sigmas, reference.sigmas)
    unshifted = FlowMatchEulerDiscreteScheduler()
    unshifted.set_timesteps(6)
    assert (sampler.sigmas[1:-2] > unshifted.sigmas[1:-2] + 0.1).all()  # shift 3 keeps more steps at high noise
    for index, timestep in enumerate(sampler.timesteps):
        latents = reference.scale_noise(clean, timestep[None], noise)
        assert sampler.scale_model_input(latents, timestep) is latents and sampler.step_index == index
        velocity = noise - clean
        torch.testing.assert_close(predicted_clean_latent(sampler, latents, velocity, timestep), clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prediction_for_clean_latent(sampler, latents, clean, timestep), velocity,
                                   atol=1e-4, rtol=1e-4)
        toward_target = prediction_for_clean_latent(sampler, latents, target, timestep)
        # The noise that x_t and the target x0 imply: x_t = (1 - σ) target + σ ε'.
        sigma = sampler.sigmas[index]
        implied_noise = (latents - (1 - sigma) * target) / sigma
        stepped = sampler.step(toward_target, timestep, latents).prev_sample
        following = sampler.sigmas[index + 1]
        torch.testing.assert_close(stepped, (1 - following) * target + following * implied_noise, atol=1e-4, rtol=1e-4)


def test_a_dynamically_shifted_schedule_takes_the_shift_of_a_view_of_the_window():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    sampler = make_flow_matching_sampler(config, view_tokens=64 * 64)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    sampler.set_timesteps(5)
    reference.set_timesteps(5, mu=calculate_shift(64 * 64))
    torch.testing.assert_close(sampler.sigmas, reference.sigmas)


# 384 x 192 px equirect: 48 x 24 latents, tall enough for band+poles' row of 16-latent windows within ±60°.
WORLD = ["--layout", "equirect", "--width", "384", "--height", "192"]


@pytest.mark.parametrize("settings", [
    [*WORLD, "--prompt-up", "clouds"],
    ["--layout", "wide", "--width", "384", "--height", "128", "--memory", "low", "--sync", "syncsde"],
    ["--layout", "tile", "--width", "128", "--height", "128"],
    [*WORLD, "--views", "cube", "--sync", "syncdiffusion", "--sync-steps", "2", "--sync-loss", "lpips-alex",
     "--sync-loss-backbone", "random"],
    [*WORLD, "--schedule", "shifted", "--mad-steps", "1"],
], ids=["equirect-band+poles-prompt-up", "wide-low-memory-syncsde", "tile", "cube-syncdiffusion", "equirect-shifted-mad"])
def test_every_layout_runs_on_sd3_through_the_cli(tiny_sd3, tmp_path, capsys, settings):
    torch.manual_seed(0)  # SyncDiffusion's random LPIPS trunk (pnet_rand) is drawn from torch's global generator
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a canyon", "--steps", "2", "--seed", "3", "--model", tiny_sd3,
                 "--device", "cpu", "--out", str(out), *settings])
    assert code == 0, capsys.readouterr().err
    metadata = json.loads((out / "metadata.json").read_text())
    image = np.asarray(Image.open(out / "panorama.png"))
    assert image.shape == (metadata["params"]["height"], metadata["params"]["width"], 3) and image.std() > 1
    assert metadata["params"]["window"] == 16 and metadata["scheduler"] == "FlowMatchingSampler"
    layout = settings[settings.index("--layout") + 1]
    if layout == "equirect":
        assert all((out / name).is_file() for name in ("sky.exr", "lighting.json")) or metadata["view_set"]
    if "--prompt-up" in settings:
        assert "clouds" in metadata["view_prompts"]["U"]
    if "syncsde" in settings:
        assert metadata["syncsde"]["conditioned_views"] == metadata["views"] - 1 and metadata["fusion"] == "own"
    if "syncdiffusion" in settings:
        assert metadata["syncdiffusion"]["guided_steps"] == 2 and metadata["fusion"] == "clean"
    expected_schedule = "shifted" if layout == "tile" or "shifted" in settings else "dense"
    assert metadata["schedule"] == expected_schedule
    if "--mad-steps" in settings:  # band+poles (its rows aligned to the 2-latent patches), MAD following each step's views
        assert metadata["mad"] == {"steps": 1, "blocks": ["down", "mid", "up"]} and metadata["view_set"] == "band+poles"


@pytest.mark.parametrize("flags,expected", [
    (["--mad-steps", "2", "--layout", "equirect", "--width", "384", "--height", "192", "--prompt-up", "clouds"],
     "cannot keep the different prompts that --prompt-up/--prompt-down gives them"),
    (["--sync", "syncdiffusion", "--sync-decoder", "taesd"], "TAESD does not decode"),
    (["--scheduler", "ddim"], "leave --scheduler auto (not ddim)"),
    (["--window", "15"], "whole number of its 2-latent patches"),
    (["--window", "34", "--width", "512", "--height", "512"], "at most 32 latents wide; try --window 32"),
], ids=["mad with per-view prompts", "taesd", "scheduler", "odd window", "window past the position grid"])
def test_what_sd3_cannot_run_is_one_sentence_before_the_job(tiny_sd3, tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--layout", "wide", "--width", "256", "--height", "128", "--steps", "1",
                 "--model", tiny_sd3, "--device", "cpu", "--out", str(out), *flags])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and error.endswith(".")
    assert expected in error
    assert not out.exists()


def test_a_lora_on_sd3_is_refused_before_anything_loads(tiny_sd3, tmp_path):
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(lora))
    request = GenerateRequest(prompt="x", layout="wide", width=256, height=128, steps=1, model=tiny_sd3, lora=str(lora),
                              device="cpu", out=str(tmp_path / "out"))
    with pytest.raises(BadRequest, match="LoRAs are only fused into UNet models here"):
        check_request(request)


def test_models_list_reports_the_sd3_family(tiny_sd3, capsys):
    assert main(["models", "list", "--folder", os.path.dirname(tiny_sd3), "--json"]) == 0
    listed = {model["id"]: model for model in json.loads(capsys.readouterr().out)}
    model = listed[tiny_sd3]
    assert (model["family"], model["architecture"], model["kind"], model["complete"]) == ("SD3", "SD3", "folder", True)


def test_a_start_image_is_noised_along_the_flow_and_runs_the_last_steps(tiny_sd3, tmp_path, capsys):
    # img2img on a flow-matching model: the start is (1 - σ) x0 + σ noise at the first step that runs.
    sampler = make_flow_matching_sampler(FlowMatchEulerDiscreteScheduler(shift=3.0).config, view_tokens=64)
    sampler.set_timesteps(4)
    sampler.set_begin_index(2)
    clean, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    sigma = sampler.sigmas[2]
    torch.testing.assert_close(sampler.add_noise(clean, noise, sampler.timesteps[2:3]), (1 - sigma) * clean + sigma * noise)

    start = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)).save(start)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a canyon", "--steps", "4", "--seed", "3", "--model", tiny_sd3, "--device", "cpu",
                 "--out", str(out), "--layout", "wide", "--width", "256", "--height", "128", "--init-image", str(start),
                 "--strength", "0.5"])
    assert code == 0, capsys.readouterr().err
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["start"]["steps_run"] == 2 and metadata["start"]["strength"] == 0.5


def test_mad_blocks_name_thirds_of_a_transformers_blocks():
    # SD3 medium has 24 blocks, SD3.5 large 38; every block attends on the grid of 2x2-latent patches.
    assert {name: list(indices) for name, indices in transformer_block_groups(24).items()} == {
        "down": list(range(0, 8)), "mid": list(range(8, 16)), "up": list(range(16, 24))}
    assert [len(indices) for indices in transformer_block_groups(38).values()] == [13, 13, 12]
    assert {name: list(indices) for name, indices in transformer_block_groups(2).items()} == {"down": [0], "mid": [1], "up": []}
    config = dict(TINY_SD3_TRANSFORMER, num_layers=24)
    assert block_divisors(config) == {"down": 2, "mid": 2, "up": 2} and block_divisors(config, "up") == {"up": 2}


def _sd3_denoiser(tiny_sd3, models):
    """(the cached tiny SD3 pipeline, its guided denoiser for "a canyon" at guidance 6)."""
    checked = check_request(GenerateRequest(prompt="a canyon", layout="wide", width=128, height=128, model=tiny_sd3,
                                            device="cpu", out="/unused"))
    pipeline = models.get(checked).pipeline
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        ["a canyon"], None, None, device="cpu", do_classifier_free_guidance=True)
    return pipeline, GuidedSD3TransformerDenoiser(pipeline.transformer, embeds, negative[:1], pooled,
                                                  negative_pooled[:1], 6.0)


def test_mad_on_one_window_is_the_transformers_own_attention(tiny_sd3, models):
    # Merging one view that covers the canvas is the identity: MAD's prediction is the plain one, and every joint
    # attention layer merged once.
    pipeline, denoiser = _sd3_denoiser(tiny_sd3, models)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = denoiser(latents, torch.tensor(700.0), [0])
    views = CanvasViews(Canvas("wide", 16, 16), [CropView(0, 0, 16, 16)])
    with MergedAttention(pipeline.transformer, views, steps=1) as mad:
        mad.begin_step(0)
        merged = mad.wrap(denoiser)(latents, torch.tensor(700.0), [0])
        assert set(mad.processors) == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
        assert all(processor.merged_calls == 1 for processor in mad.processors.values())
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    # Two views with different prompts (the job refuses them with MAD): the joint layers run per view, unmerged.
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        ["a canyon", "a canyon, clouds"], None, None, device="cpu", do_classifier_free_guidance=True)
    prompted = GuidedSD3TransformerDenoiser(pipeline.transformer, embeds, negative[:1], pooled, negative_pooled[:1],
                                            6.0, view_prompts=[0, 1])
    pair = CanvasViews(Canvas("wide", 16, 24), [CropView(0, 0, 16, 16), CropView(0, 8, 16, 16)])
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with MergedAttention(pipeline.transformer, pair, steps=1) as mad:
        mad.begin_step(0)
        unmerged = mad.wrap(prompted)(latents, torch.tensor(700.0), [0, 1])
        assert all(processor.merged_calls == 0 for processor in mad.processors.values())
    assert torch.equal(unmerged, prompted(latents, torch.tensor(700.0), [0, 1]))


def test_mad_on_sd3_merges_a_batch_in_any_order_or_a_subset_consistently(tiny_sd3, models):
    # SyncDiffusion's gradient pass predicts chunks of views in its own order; two windows of four leave part of the
    # canvas unseen and attend among the tokens they see, as the same two windows on a canvas of just those do.
    pipeline, denoiser = _sd3_denoiser(tiny_sd3, models)
    views = canvas_views(Canvas("equirect", 16, 32), "band", 16, 8)
    latents = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    timestep = torch.tensor(700.0)
    with MergedAttention(pipeline.transformer, views, steps=1) as mad:
        mad.begin_step(0)
        predict = mad.wrap(denoiser)
        ordered = predict(latents, timestep, [0, 1, 2, 3])
        shuffled = predict(latents[[2, 0, 3, 1]], timestep, [2, 0, 3, 1])
        pair = predict(latents[[1, 0]], timestep, (1, 0))
    torch.testing.assert_close(shuffled, ordered[[2, 0, 3, 1]], atol=1e-5, rtol=1e-5)
    alone = CanvasViews(Canvas("wide", 16, 24), [CropView(0, 0, 16, 16), CropView(0, 8, 16, 16)])
    with MergedAttention(pipeline.transformer, alone, steps=1) as mad:
        mad.begin_step(0)
        expected = mad.wrap(denoiser)(latents[[0, 1]], timestep, (0, 1))
    torch.testing.assert_close(pair, expected[[1, 0]], atol=1e-5, rtol=1e-5)
    assert (pair - denoiser(latents[[1, 0]], timestep, (1, 0))).abs().max() > 1e-4


def test_mad_on_sd3_ties_two_windows_across_the_wrap_and_gives_the_processors_back(tiny_sd3, models, tmp_path, monkeypatch):
    # Two windows side by side on a 32-latent equirect band (stride 16: no overlap, so without MAD nothing ties them).
    # MAD for the first of two steps: each joint attention layer merges the two views once (the batch of both, with
    # their (uncond, cond) rows), the image changes, the ±180° seam stays as seamless as without, and the cached
    # transformer has its very own processors back after the job.
    merges = []

    def spy(feature_views, tokens, branches):
        merges.append((len(feature_views), tokens.shape, branches))
        return merge_views(feature_views, tokens, branches)

    monkeypatch.setattr(mad_module, "merge_views", spy)
    images = {}
    for mad_steps in (0, 1):
        checked = check_request(GenerateRequest(
            prompt="a canyon", layout="equirect", width=256, height=128, views="band", stride=16, steps=2, seed=3,
            mad_steps=mad_steps, model=tiny_sd3, device="cpu", out=str(tmp_path / f"mad{mad_steps}")))
        transformer = models.get(checked).pipeline.transformer
        before = dict(transformer.attn_processors)
        outputs = run_job(checked, models=models)
        assert all(processor is before[name] for name, processor in transformer.attn_processors.items())
        images[mad_steps] = np.asarray(Image.open(outputs["png"]))
        metadata = json.loads(open(outputs["metadata"]).read())
        assert metadata["views"] == 2 and ("mad" in metadata) == bool(mad_steps)
    assert merges == [(2, (4, 64, 16), 2)] * 2  # 2 layers x 1 step; 8 x 8 patches of 16 wide (the tiny hidden width)
    assert np.abs(images[1].astype(float) - images[0]).mean() > 0.25  # 0.9 levels on average: merged at sigma 1 only
    assert seam_ratio(images[1], 1) <= max(1.2, 1.05 * seam_ratio(images[0], 1))


def test_syncsde_gain_on_the_flow_is_the_ddim_family_gain():
    # A score change d at x_t changes the noise estimate eps = -sigma * score by -sigma d, hence the velocity
    # v = (eps - x_t) / (1 - sigma) (from x0 = (x_t - sigma eps) / (1 - sigma)) by -sigma d / (1 - sigma); the flow's
    # Euler step then moves by sigma^2 * gamma * d, gamma = score_step_gain: the DDIM family's (1 - a_t) gamma_t with
    # alpha = 1 - sigma, s = sigma. It is also the alphas_cumprod gamma of that path at unit variance times r_prev / r_t.
    sampler = FlowMatchingSampler(**SD3_SCHEDULER)
    sampler.set_timesteps(6)
    generator = torch.Generator().manual_seed(5)
    latents, velocity, score = (torch.randn(1, 16, 8, 8, generator=generator) for _ in range(3))
    for index, timestep in enumerate(sampler.timesteps):
        sigma, following = float(sampler.sigmas[index]), float(sampler.sigmas[index + 1])
        gain = score_step_gain(sampler, index, timestep)
        if index == 0:
            assert sigma == 1.0 and gain == 0.0  # pure noise: no finite gain, no pull
            continue
        steps = [copy.deepcopy(sampler) for _ in range(2)]
        for trial in steps:
            trial.scale_model_input(latents, timestep)
        plain = steps[0].step(velocity, timestep, latents).prev_sample
        moved = steps[1].step(velocity - sigma * score / (1 - sigma), timestep, latents).prev_sample
        torch.testing.assert_close(moved - plain, sigma**2 * gain * score, atol=1e-4, rtol=1e-4)
        radius = [math.hypot(1 - value, value) for value in (sigma, following)]
        now, then = ((1 - value) ** 2 / r**2 for value, r in zip((sigma, following), radius))
        unit_variance = math.sqrt(then / now) - math.sqrt((1 - then) / (1 - now))
        assert gain == pytest.approx(unit_variance * radius[1] / radius[0], rel=1e-6)


class _Recording(SyncSDE):
    """SyncSDE that keeps the view latents it last composed (the final views after a run)."""

    def compose(self, view_latents):
        self.final_views = view_latents.clone()
        return super().compose(view_latents)


def test_syncsde_on_sd3_is_the_flows_euler_step_for_one_view_and_pulls_overlaps_together(tiny_sd3, models):
    pipeline, denoiser = _sd3_denoiser(tiny_sd3, models)

    def sample(views, sync, steps=10):
        noise = initial_noise(3, (1, 16, views.canvas.height, views.canvas.width), torch.device("cpu"), torch.float32)
        sampler = make_flow_matching_sampler(pipeline.scheduler.config, view_tokens=64)
        return sample_canvas(denoiser, sampler, views, noise, steps=steps, view_batch=2, sync=sync)

    # One view: no neighbour, nothing pulled, each step the sampler's Euler step, as MultiDiffusion of one window.
    single = CanvasViews(Canvas("wide", 16, 16), [CropView(0, 0, 16, 16)])
    assert torch.equal(sample(single, Synchronisation("own", synchroniser=SyncSDE(single, 5.0)), steps=3),
                       sample(single, Synchronisation(), steps=3))
    # Two windows overlapping by half: the pull leaves them closer on their overlap than independent sampling does
    # (measured: 0.19 -> 0.057 at lambda 5; in 3 steps lambda 5 overshoots, 0.18 -> 0.42: docs/engine.md, SyncSDE).
    pair = CanvasViews(Canvas("wide", 16, 24), [CropView(0, 0, 16, 16), CropView(0, 8, 16, 16)])
    gaps = []
    for strength in (0.0, 5.0):
        sde = _Recording(pair, strength)
        assert torch.isfinite(sample(pair, Synchronisation("own", synchroniser=sde))).all()
        gaps.append(float((sde.final_views[0, :, :, 8:] - sde.final_views[1, :, :, :8]).abs().mean()))
    assert gaps[1] < 0.5 * gaps[0], gaps
