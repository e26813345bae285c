"""SyncSDE (backend/engine/sync/syncsde.py): the official wide-image correlation term, the chain of neighbours on
grids of windows and around wraps, lambda = 0 as independent sampling, the pull and the closed loop
measured on a tiny random model, the two compositions, and schedulers other than DDIM."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

from backend.sphere.canvas import Canvas
from backend.engine.denoiser import GuidedUNetDenoiser
from backend.engine.models import ModelCache
from backend.app.job import check_request
from backend.engine.generation import initial_noise, make_scheduler
from backend.request import GenerateRequest
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.engine.sync.syncsde import DEFAULT_STRENGTH, SyncSDE, score_step_gain
from backend.sphere.view_sets import CanvasViews, canvas_views

WINDOW, STRIDE, STEPS = 16, 8, 10


class Recording(SyncSDE):
    """SyncSDE that keeps the view latents it last composed (the final views after a run)."""

    def compose(self, view_latents):
        self.final_views = view_latents.clone()
        return super().compose(view_latents)


@pytest.fixture(scope="module")
def model(tiny_model):
    return ModelCache().get(check_request(GenerateRequest(prompt="a canyon", model=tiny_model, device="cpu", out="/unused")))


@pytest.fixture(scope="module")
def denoiser(model):
    embeds, negative = model.pipeline.encode_prompt(["a canyon"], model.device, 1, True, None)
    return GuidedUNetDenoiser(model.pipeline.unet, embeds, negative[:1], 7.5)


def crop_views(kind, height, width, window=WINDOW, stride=STRIDE):
    canvas = Canvas(kind, height, width)
    return CanvasViews(canvas, canvas.crop_views(window, stride))


def run(model, denoiser, views, strength, closed_loop=True, compose="paper", steps=STEPS, seed=0, scheduler="ddim",
        view_batch=4):
    """(canvas latent, the SyncSDE with its final_views) of one sampling run with the views' own states."""
    sde = Recording(views, strength, closed_loop, compose)
    noise = initial_noise(seed, (1, 4, views.canvas.height, views.canvas.width), model.device, model.dtype)
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler, model.pipeline.scheduler.config)
    latents = sample_canvas(denoiser, scheduler, views, noise, steps=steps, view_batch=view_batch,
                            sync=Synchronisation("own", synchroniser=sde))
    return latents, sde


def overlap_gap(sde, views_latents, a, b):
    """Mean |view a - view b| over the canvas pixels both see (and the channels)."""
    both = (sde._footprints[a] & sde._footprints[b]).float()
    placed = [sde._single[index].fuse(views_latents[index : index + 1]) for index in (a, b)]
    return float(((placed[0] - placed[1]).abs() * both).sum() / (both.sum() * views_latents.shape[1]))


def test_the_pull_is_the_official_wide_image_term():
    # One row of windows on a planar canvas is the paper's wide image: after the scheduler's step each window
    # moves by gamma_t * lambda * t / T times its x_t minus the previous window's x_t on their overlap.
    views = crop_views("wide", 16, 64, 16, 4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              steps_offset=1)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    previous, stepped = torch.randn(2, len(views), 4, 16, 16, generator=generator)
    sde = SyncSDE(views, 5.0, compose="paper")
    assert sde.neighbours == [[]] + [[index - 1] for index in range(1, len(views))]
    for step_index in (0, 25, 49):
        timestep = scheduler.timesteps[step_index]
        alphas = scheduler.alphas_cumprod
        now = alphas[timestep]
        following = alphas[timestep - 1000 // 50] if timestep - 1000 // 50 >= 0 else scheduler.final_alpha_cumprod
        gamma = (following / now).sqrt() - ((1 - following) / (1 - now)).sqrt()
        expected = stepped.clone()
        for index in range(1, len(views)):
            difference = previous[index, :, :, :12] - previous[index - 1, :, :, 4:]
            expected[index, :, :, :12] -= gamma * 5.0 * (timestep / scheduler.timesteps[0]) * difference
        assert score_step_gain(scheduler, step_index, timestep) == pytest.approx(float(gamma), rel=1e-5)
        got = sde.synchronise(previous, stepped, None, timestep, step_index, scheduler)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sde.synchronise(previous, stepped, None, scheduler.timesteps[0], 0, scheduler) is not stepped
    assert SyncSDE(views, 0.0).synchronise(previous, stepped, None, scheduler.timesteps[0], 0, scheduler) is stepped


def test_the_chain_runs_row_by_row_and_closes_around_the_wraps():
    # Equirect: one row of 4 windows, the first conditioned on the last only when the loop is closed.
    views = crop_views("equirect", 16, 32)
    assert SyncSDE(views, 1.0, closed_loop=False).neighbours == [[], [0], [1], [2]]
    assert SyncSDE(views, 1.0, closed_loop=True).neighbours == [[3], [0], [1], [2]]
    # Tile: a 4 x 4 grid, each window on its left and upper neighbours; closed, row and column wrap too.
    views = crop_views("tile", 16, 16, 8, 4)
    open_chain, closed = SyncSDE(views, 1.0, closed_loop=False), SyncSDE(views, 1.0)
    assert open_chain.neighbours[:6] == [[], [0], [1], [2], [0], [1, 4]]
    assert closed.neighbours[:6] == [[3, 12], [0, 13], [1, 14], [2, 15], [0, 7], [1, 4]]
    assert closed.chain == list(range(16))
    # A planar canvas has nothing to close.
    views = crop_views("wide", 32, 64)
    assert SyncSDE(views, 1.0).neighbours == SyncSDE(views, 1.0, closed_loop=False).neighbours
    # The ring of projected views closes too; the pole faces lean on the ring views they overlap.
    ring = canvas_views(Canvas("equirect", 32, 64), "ring", 16, 4)
    neighbours = SyncSDE(ring, 1.0).neighbours
    labels = ring.labels
    assert [labels[group[0]] for group in neighbours[:8]] == ["yaw-45", "yaw0", "yaw45", "yaw90", "yaw135", "yaw180",
                                                              "yaw-135", "yaw-90"]
    assert SyncSDE(ring, 1.0, closed_loop=False).neighbours[0] == []
    assert neighbours[labels.index("U")] and all(index < 8 for index in neighbours[labels.index("U")])


def test_bad_settings_are_one_sentence():
    views = crop_views("wide", 16, 32)
    with pytest.raises(ValueError, match="--syncsde-lambda must be a number >= 0"):
        SyncSDE(views, -1.0)
    with pytest.raises(ValueError, match="Unknown SyncSDE composition 'median'"):
        SyncSDE(views, 1.0, compose="median")
    assert DEFAULT_STRENGTH == 5.0


def test_lambda_zero_is_independent_sampling(model, denoiser):
    views = crop_views("equirect", 16, 64)
    _, sde = run(model, denoiser, views, 0.0, view_batch=1)
    noise = initial_noise(0, (1, 4, 16, 64), model.device, model.dtype)
    for index, crop in enumerate(views.crops):
        # The view alone: a canvas that is just its window, started from its window of the canvas noise.
        alone = Canvas("wide", WINDOW, WINDOW)
        single = CanvasViews(alone, alone.crop_views(WINDOW, WINDOW))
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        expected = sample_canvas(denoiser, scheduler, single, views.canvas.read(noise, [crop]), steps=STEPS, view_batch=1)
        assert torch.equal(sde.final_views[index : index + 1], expected)


def test_the_pull_makes_overlapping_views_agree(model, denoiser):
    views = crop_views("equirect", 16, 64)
    pairs = [(index, index + 1) for index in range(len(views) - 1)]
    gaps = {}
    for strength in (0.0, DEFAULT_STRENGTH):
        _, sde = run(model, denoiser, views, strength)
        gaps[strength] = sum(overlap_gap(sde, sde.final_views, a, b) for a, b in pairs) / len(pairs)
    # Measured: 1.21 independently, 0.048 with lambda = 5 (seed 0, 10 DDIM steps, 8 windows 16 every 8).
    assert gaps[DEFAULT_STRENGTH] < 0.2 * gaps[0.0]


def test_closing_the_loop_removes_the_wrap_seam(model, denoiser):
    # The wrap seam of the chain: how much the last window and the first disagree where they overlap across
    # longitude ±180°, relative to how much consecutive windows disagree inside the chain. (On this random
    # model the latents and images are near-white noise, so a seam statistic of the canvas cannot see it:
    # seam_ratio of the decoded image measured 0.71 open and closed, and 0.77 for both with the image rolled
    # so that the chain's break, where the last window's wrapped columns end, lies on its edge.)
    views = crop_views("equirect", 16, 64)
    last = len(views) - 1
    ratios = {}
    for closed in (False, True):
        _, sde = run(model, denoiser, views, DEFAULT_STRENGTH, closed_loop=closed)
        inner = sorted(overlap_gap(sde, sde.final_views, index, index + 1) for index in range(last))
        ratios[closed] = overlap_gap(sde, sde.final_views, last, 0) / inner[len(inner) // 2]
    # Measured (seed 0, 10 DDIM steps, 8 windows): wrap gap 1.31 open, 0.041 closed; inner median 0.047;
    # ratios open 27.8, closed 0.88.
    assert ratios[True] < 2.0 < 10.0 < ratios[False]


def test_paper_and_average_compositions(model, denoiser):
    views = crop_views("tile", 32, 32)
    paper, sde = run(model, denoiser, views, DEFAULT_STRENGTH, compose="paper", steps=4)
    average, sde_average = run(model, denoiser, views, DEFAULT_STRENGTH, compose="average", steps=4)
    assert paper.shape == average.shape == (1, 4, 32, 32)
    assert torch.equal(sde.final_views, sde_average.final_views)  # the composition never feeds back
    assert torch.equal(average, views.fuse(sde.final_views))
    assert (paper - average).abs().max() > 1e-3
    # Later windows on top: the last window of the chain shows whole, the first only where no later one covers it.
    assert torch.equal(views.canvas.read(paper, [views.crops[sde.chain[-1]]]), sde.final_views[sde.chain[-1] :][:1])


@pytest.mark.parametrize("scheduler_class", [LCMScheduler, EulerDiscreteScheduler])
def test_few_step_and_sigma_schedulers(model, denoiser, scheduler_class):
    views = crop_views("equirect", 16, 64)
    scheduler = scheduler_class.from_config(model.pipeline.scheduler.config)
    latents, sde = run(model, denoiser, views, DEFAULT_STRENGTH, steps=4, scheduler=scheduler)
    assert latents.shape == (1, 4, 16, 64) and torch.isfinite(latents).all()
    scheduler.set_timesteps(4)
    gains = [score_step_gain(scheduler, index, timestep) for index, timestep in enumerate(scheduler.timesteps)]
    assert all(math.isfinite(gain) and gain > 0 for gain in gains)
    _, independent = run(model, denoiser, views, 0.0, steps=4, scheduler=scheduler_class.from_config(model.pipeline.scheduler.config))
    assert overlap_gap(sde, sde.final_views, 0, 1) < overlap_gap(independent, independent.final_views, 0, 1)


@pytest.mark.parametrize("name", ["ring", "band+poles"])
def test_projected_view_sets_run(model, denoiser, name):
    views = canvas_views(Canvas("equirect", 32, 64), name, 16, 8)
    noise = initial_noise(0, (1, 4, 32, 64), model.device, model.dtype)
    own = initial_noise(2, (len(views.projected), 4, 16, 16), model.device, model.dtype)

    def sample(strength):
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        return sample_canvas(denoiser, scheduler, views, noise, steps=3, view_batch=8, projected_noise=own,
                             sync=Synchronisation("own", synchroniser=Recording(views, strength)))

    latents = sample(DEFAULT_STRENGTH)
    assert latents.shape == (1, 4, 32, 64) and torch.isfinite(latents).all()
    assert not torch.allclose(latents, sample(0.0))  # the pull acts on these view sets too


def test_sync_syncsde_through_the_command_line(tiny_model, tmp_path):
    import json

    from backend.app.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a canyon", "--model", tiny_model, "--out", str(out), "--layout", "equirect",
                 "--width", "256", "--height", "128", "--window", "16", "--stride", "8", "--steps", "3", "--seed", "1",
                 "--device", "cpu", "--sync", "syncsde", "--syncsde-compose", "average"])
    assert code == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["sync"] == "syncsde" and metadata["fusion"] == "own"
    assert metadata["syncsde"] == {"lambda": DEFAULT_STRENGTH, "closed_loop": True, "compose": "average",
                                   "conditioned_views": metadata["views"]}


@pytest.mark.parametrize("args,message", [
    (["--sync", "syncsde", "--syncsde-lambda", "-1"], "--syncsde-lambda must be a number >= 0"),
    (["--syncsde-lambda", "2"], "--syncsde-lambda only applies to SyncSDE; add --sync syncsde"),
    (["--sync", "syncsde", "--sync-weight", "3"], "--sync-weight only applies to SyncDiffusion"),
    (["--sync", "syncsde", "--fusion", "clean"], "--fusion does not apply to SyncSDE"),
    (["--sync", "syncsde", "--syncsde-compose", "median"], "Unknown --syncsde-compose 'median'"),
])
def test_bad_syncsde_flags_are_one_sentence_and_exit_2(tiny_model, tmp_path, capsys, args, message):
    from backend.app.cli import main

    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--device", "cpu", *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not out.exists()
