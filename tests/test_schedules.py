"""The shifted view schedule (SpotDiffusion): windows that cover the canvas once per step and move every step.

Geometry first (every position covered, exactly once where an axis wraps, the pushed edge windows the only
overlap on a planar axis), then the loop: canvas fusion with windows that never move equals MultiDiffusion, a
shift of the noise with the offsets shifts the result (no seam on the torus), the same seed repeats, the
methods that compose with it run through the product, and the combinations that cannot are one sentence.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend.analysis.metrics import seam_ratio
from backend.app.cli import main
from backend.app.job import check_request, run_job
from backend.engine.generation import initial_noise, make_scheduler
from backend.engine.sampler import Synchronisation, sample_canvas
from backend.errors import BadRequest
from backend.request import GenerateRequest
from backend.sphere.canvas import Canvas
from backend.sphere.schedules import ViewSchedule, shifted_crops, shifted_offsets, shifted_starts
from backend.sphere.view_sets import CanvasViews, canvas_views

WINDOW = 16


def _coverage(canvas: Canvas, crops) -> torch.Tensor:
    return canvas.coverage(crops, torch.zeros(()))[0, 0]


@pytest.mark.parametrize("size,offset", [(64, 0), (64, 5), (64, 15), (16, 7), (48, 9)])
def test_a_wrapping_axis_is_covered_exactly_once_at_any_offset(size, offset):
    starts = shifted_starts(size, WINDOW, offset, wraps=True)
    count = np.zeros(size, int)
    for start in starts:
        count[(start + np.arange(WINDOW)) % size] += 1
    assert (count == 1).all() and len(starts) == size // WINDOW


def test_a_wrapping_axis_that_is_no_multiple_of_the_window_overlaps_in_one_place():
    starts = shifted_starts(40, WINDOW, 6, wraps=True)
    count = np.zeros(40, int)
    for start in starts:
        count[(start + np.arange(WINDOW)) % 40] += 1
    assert (count >= 1).all() and (count == 2).sum() == 3 * WINDOW - 40


@pytest.mark.parametrize("size,offset", [(64, 0), (64, 1), (64, 9), (16, 3), (50, 12)])
def test_a_planar_axis_is_covered_and_only_its_pushed_edge_windows_overlap(size, offset):
    starts = shifted_starts(size, WINDOW, offset, wraps=False)
    assert all(0 <= start <= size - WINDOW for start in starts)
    count = np.zeros(size, int)
    for start in starts:
        count[start : start + WINDOW] += 1
    assert (count >= 1).all()
    # Interior windows sit on the shifted grid: only a window pushed in from an edge may overlap a neighbour.
    interior = [start for start in starts if 0 < start < size - WINDOW]
    assert all((start - offset) % WINDOW == 0 for start in interior)
    if size % WINDOW == 0 and offset == 0:
        assert (count == 1).all()


def test_a_planar_axis_covers_only_the_rows_it_is_asked_for():
    starts = shifted_starts(128, WINDOW, 3, wraps=False, needed=(40, 90))
    rows = np.zeros(128, int)
    for start in starts:
        rows[start : start + WINDOW] += 1
    assert (rows[40:90] >= 1).all() and min(starts) == 40 and max(starts) == 90 - WINDOW


@pytest.mark.parametrize("offset", [(0, 0), (5, 11), (15, 1)])
def test_tile_windows_cover_the_torus_exactly_once(offset):
    canvas = Canvas("tile", 32, 48)
    assert (_coverage(canvas, shifted_crops(canvas, WINDOW, offset)) == 1).all()


def test_a_one_window_tile_is_one_view_shifted_every_step():
    canvas = Canvas("tile", WINDOW, WINDOW)
    schedule = ViewSchedule(CanvasViews(canvas, canvas.crop_views(WINDOW, 2)), shifted_offsets(4, 6, WINDOW))
    assert schedule.views_per_step() == [1] * 6
    assert len({(views.crops[0].top, views.crops[0].left) for views in map(schedule.views_at, range(6))}) > 1


@pytest.mark.parametrize("offset", [(0, 0), (0, 7), (0, 13)])
def test_wide_windows_never_wrap_and_overlap_only_at_the_edges(offset):
    canvas = Canvas("wide", WINDOW, 64)
    crops = shifted_crops(canvas, WINDOW, offset)
    count = _coverage(canvas, crops)
    assert all(crop.left + crop.width <= 64 for crop in crops) and (count >= 1).all()
    overlap = (count > 1).nonzero()[:, 1]
    if offset[1]:
        assert len(crops) == 5 and set(overlap.tolist()) == set(range(offset[1], WINDOW)) | set(range(64 - WINDOW, 64 - WINDOW + offset[1]))
    else:
        assert len(crops) == 4 and len(overlap) == 0


def test_equirect_windows_cover_the_band_once_around_the_seam_and_keep_the_pole_faces():
    dense = canvas_views(Canvas("equirect", 64, 128), "band+poles", WINDOW, 4)
    first, stop = min(c.top for c in dense.crops), max(c.top + c.height for c in dense.crops)
    schedule = ViewSchedule(dense, shifted_offsets(1, 12, WINDOW))
    for step in range(12):
        views = schedule.views_at(step)
        assert [label for label, _ in views.projected] == ["U", "D"]
        count = _coverage(views.canvas, views.crops)
        assert (count[first:stop] >= 1).all()
        assert count[:first].sum() == 0 and count[stop:].sum() == 0  # no window reaches into the pole rows
        # Longitude wraps: every row of windows tiles the full circle exactly once.
        for top in {crop.top for crop in views.crops}:
            row = [crop for crop in views.crops if crop.top == top]
            assert len(row) == 128 // WINDOW and (_coverage(views.canvas, row)[top] == 1).all()
    assert max(schedule.views_per_step()) < len(dense) / 4


def test_the_shifted_schedule_weighs_the_pole_faces_as_the_dense_views_do():
    canvas = Canvas("equirect", 64, 128)
    dense = canvas_views(canvas, "band+poles", WINDOW, 4)
    views = ViewSchedule(canvas_views(canvas, "band+poles", WINDOW, WINDOW), shifted_offsets(1, 1, WINDOW), dense).views_at(0)
    assert dense.crop_weight is None and torch.equal(views.crop_weight, dense.crop_coverage())
    # Windows hold 1, faces 3: each pixel is fused as dense would, its windows standing for dense's many.
    def fused(views):
        return views.fuse(torch.cat([torch.ones(len(views.crops), 1, WINDOW, WINDOW),
                                     torch.full((len(views.projected), 1, WINDOW, WINDOW), 3.0)]))[0, 0]

    crop_count = dense.crop_coverage()[0, 0]
    face_count = dense.coverage(torch.zeros(()))[0, 0] - crop_count
    expected = (crop_count + 3.0 * face_count) / (crop_count + face_count)
    torch.testing.assert_close(fused(dense), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused(views), expected, atol=1e-5, rtol=0)
    # Unweighted, the faces would count as much as the one window there.
    unweighted = ViewSchedule(canvas_views(canvas, "band+poles", WINDOW, WINDOW), shifted_offsets(1, 1, WINDOW)).views_at(0)
    assert unweighted.crop_weight is None and (fused(unweighted) - expected).abs().max() > 0.5


def test_offsets_come_from_the_seed():
    assert shifted_offsets(5, 20, 64) == shifted_offsets(5, 20, 64) != shifted_offsets(6, 20, 64)
    assert all(dy % 8 == 0 and dx % 8 == 0 and 0 <= dy < 64 for dy, dx in shifted_offsets(5, 50, 64, multiple=8))


@pytest.mark.parametrize("scheduler_name", ["ddim", "euler", "dpm++"])
def test_canvas_fusion_of_windows_that_never_move_equals_multidiffusion(denoiser_and_model, scheduler_name):
    """With offset 0 every step the windows are the dense schedule's at stride = window, which do not overlap:
    stepping the canvas once with the fused x0 must give MultiDiffusion's per-view steps (first-order and
    multistep samplers: the canvas keeps the one history every window would have kept)."""
    denoiser, model = denoiser_and_model
    canvas = Canvas("tile", 32, 32)
    views = CanvasViews(canvas, canvas.crop_views(WINDOW, WINDOW))
    noise = initial_noise(3, (1, 4, 32, 32), model.device, model.dtype)
    results = []
    for moving in (False, True):
        scheduler = make_scheduler(scheduler_name, model.pipeline.scheduler.config)
        plan = ViewSchedule(views, [(0, 0)] * 4) if moving else views
        sync = Synchronisation("canvas" if moving else "noisy")
        results.append(sample_canvas(denoiser, scheduler, plan, noise, steps=4, view_batch=4, sync=sync))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def test_shifting_the_noise_and_the_offsets_shifts_the_result(denoiser_and_model):
    """No position of the torus is special under the shifted schedule: rolling the noise by r and every step's
    offset by r rolls the result by r (up to float summation order)."""
    denoiser, model = denoiser_and_model
    canvas = Canvas("tile", 32, 48)
    views = CanvasViews(canvas, canvas.crop_views(WINDOW, WINDOW))
    offsets, roll = shifted_offsets(11, 4, WINDOW), (5, 21)
    rolled_offsets = [((dy + roll[0]) % WINDOW, (dx + roll[1]) % WINDOW) for dy, dx in offsets]
    noise = initial_noise(4, (1, 4, 32, 48), model.device, model.dtype)
    results = []
    for initial, step_offsets in ((noise, offsets), (torch.roll(noise, roll, dims=(2, 3)), rolled_offsets)):
        scheduler = make_scheduler("ddim", model.pipeline.scheduler.config)
        results.append(sample_canvas(denoiser, scheduler, ViewSchedule(views, step_offsets), initial, steps=4,
                                     view_batch=4, sync=Synchronisation("canvas")))
    torch.testing.assert_close(torch.roll(results[0], roll, dims=(2, 3)), results[1], atol=1e-4, rtol=1e-4)


def test_a_schedule_needs_canvas_fusion(denoiser_and_model):
    denoiser, model = denoiser_and_model
    canvas = Canvas("tile", 32, 32)
    views = CanvasViews(canvas, canvas.crop_views(WINDOW, WINDOW))
    with pytest.raises(ValueError, match="canvas"):
        sample_canvas(denoiser, make_scheduler("ddim", model.pipeline.scheduler.config), ViewSchedule(views, [(0, 0)] * 2),
                      torch.zeros(1, 4, 32, 32), steps=2, view_batch=4)


def _run(tmp_path, name, model, **fields):
    fields = {"window": WINDOW, **fields}
    request = GenerateRequest(prompt="a pine forest", model=model, device="cpu", out=str(tmp_path / name), steps=4,
                              seed=3, **fields)
    outputs = run_job(check_request(request))
    return np.asarray(Image.open(outputs["png"])), json.loads(open(outputs["metadata"]).read())


@pytest.mark.parametrize("layout,width,height,per_step", [("tile", 256, 256, 4), ("wide", 512, 128, 5),
                                                          ("equirect", 512, 256, 3 * 8 + 2)])
def test_the_same_seed_gives_the_same_image_and_metadata_counts_the_work(tiny_model, tmp_path, layout, width, height, per_step):
    fields = dict(layout=layout, width=width, height=height, schedule="shifted")
    first, metadata = _run(tmp_path, "a", tiny_model, **fields)
    second, _ = _run(tmp_path, "b", tiny_model, **fields)
    assert np.array_equal(first, second)
    assert metadata["schedule"] == metadata["params"]["schedule"] == "shifted" and metadata["fusion"] == "canvas"
    counts = metadata["views_per_step"]
    assert counts["max"] <= per_step and counts["min"] >= 1
    # Every view of every step runs the UNet twice (classifier-free guidance), nothing more.
    assert metadata["unet_rows"] == round(2 * 4 * counts["mean"])
    _, dense = _run(tmp_path, "dense", tiny_model, **{**fields, "schedule": "dense"})
    assert dense["schedule"] == "dense" and dense["unet_rows"] > 3 * metadata["unet_rows"]


@pytest.mark.parametrize("fields", [
    dict(sync="syncdiffusion", sync_steps=2, sync_loss_backbone="random", sync_loss_size=32),
    dict(mad_steps=2),
    dict(scheduler="lcm", guidance=1.0),
    dict(scheduler="dpm++", memory="low"),
    dict(prompt_up="clouds", prompt_down="grass", sun_direction=[30.0, 40.0]),
], ids=["syncdiffusion", "mad", "lcm", "dpm-low-memory", "direction-prompts"])
def test_methods_compose_with_the_shifted_schedule(tiny_model, tmp_path, fields):
    image, metadata = _run(tmp_path, "out", tiny_model, layout="equirect", width=512, height=256,
                           schedule="shifted", **fields)
    assert image.shape == (256, 512, 3) and metadata["schedule"] == "shifted"
    if "sync" in fields:
        assert metadata["syncdiffusion"]["guided_steps"] == 2
    if "mad_steps" in fields:
        assert metadata["mad"]["steps"] == 2
    if "prompt_up" in fields:
        prompts = metadata["view_prompts"]
        assert "clouds" in prompts["U"] and "grass" in prompts["D"]
        assert any(text.endswith("the sun") for text in prompts.values())


def test_the_shifted_schedule_can_be_cancelled_between_steps(tiny_model, tmp_path):
    from backend.errors import JobCancelled

    request = GenerateRequest(prompt="x", model=tiny_model, device="cpu", out=str(tmp_path / "out"), steps=6, seed=1,
                              layout="tile", width=256, height=256, window=WINDOW, schedule="shifted")
    seen = []

    def report(stage, step, total, preview):
        if stage == "denoising":
            seen.append(step)
            return step == 2

    with pytest.raises(JobCancelled):
        run_job(check_request(request), report)
    assert seen == [1, 2] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--sync", "syncsde"], "SyncSDE ties views where they overlap"),
    (["--fusion", "clean"], "always fuses on the canvas"),
    (["--stride", "8"], "--stride spaces the dense schedule's overlapping windows"),
    (["--views", "ring"], "ring view set has no crop windows"),
    (["--schedule", "sparse"], "Unknown --schedule"),
])
def test_combinations_that_cannot_shift_are_one_sentence_exit_2(tiny_model, tmp_path, capsys, args, message):
    schedule = [] if "--schedule" in args else ["--schedule", "shifted"]
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(tmp_path / "out"), *schedule, *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1 and error.endswith(".")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields", [dict(stride=8), dict(fusion="noisy"), dict(sync="syncsde"), dict(views="cube")])
def test_auto_is_dense_when_an_option_asks_for_overlapping_windows(fields):
    request = GenerateRequest(prompt="x", out="/unused", schedule="auto", **fields).validated()
    assert request.resolved_schedule == "dense"
    with pytest.raises(BadRequest):
        GenerateRequest(prompt="x", out="/unused", schedule="shifted", **fields).validated()


def test_the_wrap_of_a_shifted_tile_on_the_development_model_is_seamless(toy_model, tmp_path):
    """toy-landscape paints smooth content, so a seam would stand out against neighbouring lines."""
    ratios = []
    for seed in range(3):
        request = GenerateRequest(prompt="landscape", model=toy_model, device="cpu", out=str(tmp_path / f"t{seed}"),
                                  layout="tile", width=96, height=96, steps=20, seed=seed, schedule="shifted")
        image = np.asarray(Image.open(run_job(check_request(request))["png"]))
        ratios += [seam_ratio(image, 0), seam_ratio(image, 1)]
    # Dense MultiDiffusion measures 1.37 ± 0.08 here (docs/engine.md, "View schedules"); a real seam is 3 and more.
    assert np.mean(ratios) <= 1.5 and max(ratios) <= 2.0, ratios
