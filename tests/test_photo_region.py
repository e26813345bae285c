"""Extending a photo into a world (issue 18, ``--photo``): the photo lands on the sphere where its camera saw it,
the loop keeps its latent in the fused clean latent of every step, the written panorama holds the photo within
3/255, and bad inputs are one sentence before anything is written."""

import json

import numpy as np
import pytest
import torch

from backend.app.cli import main
from backend.engine.generation import initial_noise, make_scheduler
from backend.engine.photo_region import PHOTO_FEATHER_PX, photo_region
from backend.engine.sampler import KnownRegion, Synchronisation, sample_canvas
from backend.errors import BadRequest
from backend.products.images import read_panorama, write_png
from backend.request import GenerateRequest
from backend.sphere.canvas import Canvas
from backend.sphere.geometry import project_photo
from backend.sphere.schedules import ViewSchedule, shifted_offsets
from backend.sphere.view_sets import CanvasViews, canvas_views

WINDOW = 16


def coordinate_photo(height: int, width: int) -> np.ndarray:
    """(height, width, 3): channel 0 holds each pixel's column, channel 1 its row (bilinear sampling is exact on it)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([cols, rows, np.ones_like(cols)], axis=-1)


# ---------------------------------------------------------------------------------------- geometry


def test_the_photo_centre_lands_at_its_yaw_and_pitch_and_spans_its_field_of_view():
    """A 40x30 photo at fov 60°: its centre (col 19.5, row 14.5) is sampled at the equirect pixel of (yaw, pitch)
    (yaw 30.25°, pitch 19.75° are the centre of pixel (420, 140) of a 720x360 equirect), and, looking at the
    horizon, it spans 60° across (120 px) and 2·atan(tan 30° · 30/40) = 46.8° up (93.6 px): its aspect kept."""
    photo = coordinate_photo(30, 40)
    pixels, inside = project_photo(photo, 60.0, 30.25, 19.75, 720, 360)
    np.testing.assert_allclose(pixels[140, 420, :2], [19.5, 14.5], atol=1e-9)
    assert inside[140, 420] and inside.sum() < 0.1 * inside.size

    pixels, inside = project_photo(photo, 60.0, 0.0, 0.0, 720, 360)
    across = inside[180].sum()  # the row just below the horizon
    up = inside[:, 360].sum()  # the column just right of the centre
    assert abs(across - 120) <= 1
    assert abs(up - 2 * np.degrees(np.arctan(np.tan(np.radians(30)) * 30 / 40)) * 2) <= 1
    # Columns grow to the right and rows downwards, as in the photo; behind the camera nothing is sampled.
    assert pixels[180, 330, 0] < pixels[180, 390, 0] and pixels[150, 360, 1] < pixels[210, 360, 1]
    assert np.isnan(pixels[180, 0]).all() and not inside[:, :300].any() and not inside[:, 421:].any()


def test_the_composite_weight_is_one_inside_and_falls_to_zero_at_the_border():
    region = photo_region(np.full((30, 40, 3), 0.5), 60.0, 0.0, 0.0, 720, 360)
    assert region.alpha[~region.inside].max() == 0 and region.alpha[180, 360] == 1
    ring = region.inside & (region.alpha < 1)
    assert 0 < ring.sum() < 4 * PHOTO_FEATHER_PX * (120 + 94)
    assert np.isfinite(region.pixels).all()


# ---------------------------------------------------------------------------------------- the loop


def _known(canvas: Canvas, channels: int = 4) -> KnownRegion:
    """A known latent (a smooth random field) over a block of the canvas."""
    latent = torch.randn(1, channels, canvas.height, canvas.width, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, canvas.height, canvas.width)
    mask[..., 3:11, 6:20] = 1
    return KnownRegion(latent, mask)


@pytest.mark.parametrize("fusion, sampler", [("clean", "ddim"), ("canvas", "euler")])
def test_the_loop_keeps_the_known_latent_every_step_and_paints_the_rest(denoiser_and_model, fusion, sampler):
    """Every step's fused x0 (the preview) holds the known latent inside the mask, the final canvas latent equals
    it there, and outside it the canvas is painted, differently from a run without the region (clean fusion with
    DDIM, canvas fusion under the shifted schedule with Euler: it acts on x0, so any sampler)."""
    denoiser, model = denoiser_and_model
    canvas = Canvas("equirect", 16, 32)
    views = canvas_views(canvas, "cube", WINDOW, 8)  # the six faces: projected views only, few UNet rows
    if fusion == "canvas":
        views = ViewSchedule(CanvasViews(canvas, canvas.crop_views(WINDOW, WINDOW), views.projected, views.size),
                             shifted_offsets(2, 3, WINDOW))
    noise = initial_noise(3, (1, 4, 16, 32), model.device, model.dtype)
    projected = initial_noise(5, (len(views.views_at(0).projected if fusion == "canvas" else views.projected), 4, WINDOW, WINDOW),
                              model.device, model.dtype)
    known = _known(canvas)
    inside = known.mask.bool().expand_as(known.latent)
    results, previews = [], []
    for region in (known, None):
        result = sample_canvas(denoiser, make_scheduler(sampler, model.pipeline.scheduler.config), views, noise, steps=3,
                               view_batch=8, sync=Synchronisation(fusion), projected_noise=projected, known=region,
                               report=lambda stage, step, total, preview: previews.append(preview) if region else None,
                               preview_every=1)
        results.append(result)
    assert len(previews) == 3
    for preview in previews:
        torch.testing.assert_close(preview[inside], known.latent[inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][inside], known.latent[inside], atol=1e-6, rtol=0)
    outside = ~inside
    assert (results[0][outside] - known.latent[outside]).abs().mean() > 0.1
    assert (results[0][outside] - results[1][outside]).abs().mean() > 1e-3  # the region shapes what is around it


def test_a_fusion_without_a_clean_latent_cannot_keep_a_region(denoiser_and_model):
    denoiser, model = denoiser_and_model
    canvas = Canvas("tile", 16, 32)
    views = CanvasViews(canvas, canvas.crop_views(WINDOW, 8))
    with pytest.raises(ValueError, match="noisy"):
        sample_canvas(denoiser, make_scheduler("ddim", model.pipeline.scheduler.config), views,
                      initial_noise(1, (1, 4, 16, 32), model.device, model.dtype), steps=2, view_batch=4,
                      known=_known(canvas))


# ---------------------------------------------------------------------------------------- end to end


def test_generate_extends_a_photo_and_keeps_it_within_3_of_255(tiny_model, tmp_path):
    """``generate --photo`` on the tiny model (2 steps, 512x256; the photo 150° wide across the ±180° seam): the
    panorama's photo region is the projected photo within 3/255 on average, the rest is not the photo, metadata.json records the photo's placement."""
    photo = np.clip(coordinate_photo(48, 64) / [64, 48, 2], 0, 1)  # a smooth ramp in red and green
    path = tmp_path / "photo.png"
    write_png(str(path), photo)
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a beach", "--model", str(tiny_model), "--device", "cpu", "--layout",
                 "equirect", "--width", "512", "--height", "256", "--window", "16", "--stride", "8", "--steps", "2", "--seed", "1",
                 "--no-hdr", "--photo", str(path), "--photo-fov", "150", "--photo-yaw", "-200", "--photo-pitch", "10",
                 "--out", str(out)]) == 0
    image = read_panorama(str(out / "panorama.png"))
    region = photo_region(read_panorama(str(path)), 150.0, 160.0, 10.0, 512, 256)
    difference = np.abs(image - region.pixels).mean(axis=-1)
    print(f"photo region: {difference[region.inside].mean() * 255:.2f}/255 from the photo "
          f"({difference[region.alpha == 1].mean() * 255:.2f}/255 inside its feathered edge); "
          f"outside: {difference[~region.inside].mean() * 255:.1f}/255")
    # The tiny model's random VAE decodes far from anything (tens of /255), which only the feathered edge shows.
    assert difference[region.alpha == 1].max() <= 1 / 255  # the photo itself, up to the PNG's rounding
    assert difference[region.inside].mean() <= 3 / 255
    assert difference[~region.inside].mean() > 10 / 255
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["params"]["photo"] == str(path) and metadata["params"]["photo_yaw"] == 160.0
    assert metadata["photo"]["fov"] == 150.0 and 0 < metadata["photo"]["latent_share"] < metadata["photo"]["pixel_share"]
    assert metadata["fusion"] == "clean"


@pytest.mark.parametrize("overrides, words", [
    (dict(photo="missing.png", photo_fov=60.0), "The photo"),
    (dict(photo="notes.txt", photo_fov=60.0), "not a .png, .jpg or .exr file"),
    (dict(photo="photo.png"), "needs --photo-fov"),
    (dict(photo="photo.png", photo_fov=200.0), "--photo-fov must be between 1 and 179"),
    (dict(photo="photo.png", photo_fov=60.0, photo_pitch=95.0), "--photo-pitch 95° is off the sphere"),
    (dict(photo="photo.png", photo_fov=60.0, layout="tile"), "applies only to --layout equirect"),
    (dict(photo="photo.png", photo_fov=60.0, fusion="noisy"), "--fusion noisy"),
    (dict(photo="photo.png", photo_fov=60.0, sync="syncsde"), "--sync syncsde"),
    (dict(photo_fov=60.0), "add --photo FILE"),
])
def test_bad_photo_options_are_one_sentence(tmp_path, overrides, words):
    (tmp_path / "notes.txt").write_text("words")
    write_png(str(tmp_path / "photo.png"), np.zeros((8, 16, 3)))
    values = {"prompt": "x", "out": str(tmp_path / "out"), **overrides}
    if "photo" in values:
        values["photo"] = str(tmp_path / values["photo"])
    with pytest.raises(BadRequest) as error:
        GenerateRequest(**values).validated()
    assert words in str(error.value) and str(error.value).count(". ") == 0


@pytest.mark.parametrize("flags, words", [
    (["--photo", "missing.png", "--photo-fov", "60"], "does not exist"),
    (["--photo", "photo.png", "--photo-fov", "200"], "--photo-fov must be between 1 and 179"),
    (["--photo", "photo.png", "--photo-fov", "60", "--layout", "tile"], "applies only to --layout equirect"),
    (["--photo", "broken.png", "--photo-fov", "60"], "Could not read"),
])
def test_the_command_refuses_a_bad_photo_with_exit_2_and_writes_nothing(tmp_path, capsys, flags, words):
    write_png(str(tmp_path / "photo.png"), np.zeros((8, 16, 3)))
    (tmp_path / "broken.png").write_text("not a png")
    flags = [str(tmp_path / flag) if flag.endswith(".png") else flag for flag in flags]
    code = main(["generate", "--prompt", "x", "--model", "/nonexistent/model", *flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
