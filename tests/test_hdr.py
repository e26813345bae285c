"""HDR lighting (issue #8): light sources found on the sphere, the sun expanded to a measured irradiance
ratio, lighting.json, `python -m backend hdr`, and the files an equirect generation writes.

Synthetic panoramas: a sky gradient with discs of known direction and size drawn with our geometry
(docs/conventions.md#directions), written as 8-bit PNGs where the command reads files.
"""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from backend.app.cli import main
from backend.sphere.geometry import equirect_to_direction, lonlat_to_direction
from backend.products.hdr import (
    HALO_WIDTH,
    LUMINANCE_WEIGHTS,
    MAX_SOURCES,
    angular_distance_deg,
    find_light_sources,
    label_on_sphere,
    make_hdr,
    pixel_solid_angles,
)
from backend.products.images import read_exr, srgb_to_linear

WIDTH, HEIGHT = 512, 256


def directions(height=HEIGHT):
    """Unit directions (H, 2H, 3) of the equirect pixel centres."""
    rows, cols = np.mgrid[0:height, 0:2 * height]
    return equirect_to_direction(cols, rows, 2 * height, height)


def daylight_sky(height=HEIGHT):
    """An sRGB-encoded (H, 2H, 3) clear sky: blue, paler towards the horizon, over brown ground; nothing clipped."""
    lat = np.arcsin(directions(height)[..., 1])
    image = np.empty((height, 2 * height, 3))
    towards_horizon = np.clip(1.0 - lat / (np.pi / 2), 0.0, 1.0)
    image[..., 0] = 0.30 + 0.30 * towards_horizon
    image[..., 1] = 0.45 + 0.25 * towards_horizon
    image[..., 2] = 0.85
    image[lat < 0] = (0.40, 0.33, 0.25)
    return image


def add_disc(image, yaw, pitch, radius_deg, value=(1.0, 1.0, 1.0)):
    """Paint the pixels whose centre lies within ``radius_deg`` of (yaw, pitch) with ``value``; returns image."""
    centre = lonlat_to_direction(math.radians(yaw), math.radians(pitch))
    image[directions(image.shape[0]) @ centre >= math.cos(math.radians(radius_deg))] = value
    return image


def write_png(path, image):
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return str(path)


def read_png_linear(path):
    with Image.open(path) as image:
        return srgb_to_linear(np.asarray(image.convert("RGB"), np.float32) / 255.0)


# ------------------------------------------------------------------ finding sources


@pytest.mark.parametrize("yaw,pitch,radius", [
    (30.0, 40.0, 3.0),     # an ordinary sun
    (-120.0, 80.0, 4.0),   # near the pole: its pixels are many and small, counted by solid angle
    (179.0, 20.0, 3.0),    # across the ±180° seam: one source, not two halves
    (60.0, 88.5, 2.5),     # over the pole itself
])
def test_a_sun_disc_is_found_at_its_direction_and_size(yaw, pitch, radius):
    linear = srgb_to_linear(add_disc(daylight_sky(), yaw, pitch, radius))
    result = make_hdr(linear)
    assert len(result.sources) == 1
    sun = result.sources[0]
    assert sun.is_sun and not sun.placed
    wanted = lonlat_to_direction(math.radians(yaw), math.radians(pitch))
    assert angular_distance_deg(sun.direction, wanted) < 1.0
    assert abs(sun.angular_radius_deg - radius) < 0.2 * radius
    assert sun.color == pytest.approx((1.0, 1.0, 1.0))
    # The disc is drawn at the detected place: its pixels (all at the peak value) lie within its radius.
    disc = directions()[result.hdr[..., 1] >= result.hdr[..., 1].max() * (1 - 1e-6)]
    assert len(disc) > 10 and np.degrees(np.arccos(np.clip(disc @ wanted, -1, 1))).max() < radius + 1.0
    # Exactly what lighting.json says: the sun's irradiance is sun_ratio times the diffuse irradiance.
    entry = result.lighting["sources"][0]
    assert entry["irradiance_ratio"] == pytest.approx(6.0) and result.lighting["sun_ratio"] == 6.0
    assert entry["radiance"] > 100.0  # an unclipped sun: far above the sky's 1.0


def test_regions_connect_across_the_seam_and_the_poles():
    mask = np.zeros((8, 16), bool)
    mask[3:5, 0] = mask[3:5, 15] = True    # one region cut by the seam
    mask[0, 2] = mask[0, 10] = True        # opposite each other across the north pole
    mask[7, 5] = True                      # alone
    labels, count = label_on_sphere(mask)
    assert count == 3
    assert labels[3, 0] == labels[4, 15] and labels[0, 2] == labels[0, 10]
    assert len({labels[3, 0], labels[0, 2], labels[7, 5]}) == 3


def test_an_overcast_sky_has_no_source_and_is_left_as_linearised(tmp_path):
    """A smooth grey-white sky: brightest at the zenith (a cap of about 30°, saturated but not compact), a
    white cloud bank all round the horizon, a bright thin line: nothing is a light source, nothing expanded."""
    lat = np.arcsin(directions()[..., 1])
    image = np.repeat((0.5 + 0.5 * np.clip(np.sin(lat), 0, 1))[..., None], 3, axis=2)
    image[np.abs(lat - 0.2) < 0.08] = 0.97  # the cloud bank: a clipped band 9° high right round
    image[128, 40:200] = 1.0  # a 1-pixel clipped line, 110° long
    assert (srgb_to_linear(image) @ LUMINANCE_WEIGHTS >= 0.85).mean() > 0.05  # plenty is near saturation
    out = tmp_path / "out"
    assert main(["hdr", write_png(tmp_path / "overcast.png", image), "--out", str(out)]) == 0
    lighting = json.loads((out / "lighting.json").read_text())
    assert lighting["sources"] == []
    hdr, sky = read_exr(str(out / "panorama.exr")), read_exr(str(out / "panorama_sky.exr"))
    np.testing.assert_array_equal(hdr, sky)
    np.testing.assert_allclose(hdr, read_png_linear(tmp_path / "overcast.png"), atol=1e-6)
    # No sun: the diffuse irradiance is the sky's on a plane facing straight up.
    up = np.maximum(directions()[..., 1], 0) * pixel_solid_angles(HEIGHT, WIDTH)[:, None]
    assert lighting["diffuse_irradiance"] == pytest.approx(float(np.einsum("hw,hwc->c", up, hdr) @ LUMINANCE_WEIGHTS), rel=1e-4)


def test_the_bright_top_of_a_smooth_overcast_gradient_is_not_a_sun():
    # Brightest at the zenith (242/255): its near-saturated top is a compact 17° cap, but nothing clips.
    lat = np.arcsin(directions()[..., 1])
    image = np.repeat((0.5 + 0.45 * np.clip(np.sin(lat), 0, 1))[..., None], 3, axis=2)
    assert (srgb_to_linear(image) @ LUMINANCE_WEIGHTS >= 0.85).any()
    assert find_light_sources(srgb_to_linear(image)) == []
    # The same sky with a clipped sun in it: that sun, and only it.
    sources = find_light_sources(srgb_to_linear(add_disc(image, 40.0, 35.0, 2.0)))
    assert len(sources) == 1 and abs(sources[0].yaw_deg - 40.0) < 1 and abs(sources[0].pitch_deg - 35.0) < 1


def test_a_night_scene_with_three_lamps_has_three_sources_and_no_sun():
    image = np.full((HEIGHT, WIDTH, 3), 0.06)  # a dark sky
    lamps = [(-100.0, 10.0), (20.0, 25.0), (140.0, -5.0)]
    for yaw, pitch in lamps:
        add_disc(image, yaw, pitch, 1.5, value=(1.0, 0.95, 0.8))  # warm, clipped lamps
    result = make_hdr(srgb_to_linear(image))
    assert len(result.sources) == 3
    assert not any(source.is_sun for source in result.sources)  # two are above the horizon: still no sun
    for yaw, pitch in lamps:
        wanted = lonlat_to_direction(math.radians(yaw), math.radians(pitch))
        assert min(angular_distance_deg(source.direction, wanted) for source in result.sources) < 1.0
    for entry in result.lighting["sources"]:
        assert max(entry["color"]) == pytest.approx(1.0) and entry["color"][2] < 0.8  # warm
        assert entry["radiance"] > 1.0 and entry["irradiance"] > 0


def test_small_sparkle_is_not_a_source():
    image = daylight_sky()
    image[200, 100] = image[60, 300] = image[61, 301] = 1.0  # single clipped pixels and a pair
    assert find_light_sources(srgb_to_linear(image)) == []


def city_lights(image, count, rng, radius=(1.0, 1.6)):
    """Paint ``count`` small clipped warm-white lights (discs of a random radius in degrees) scattered round the
    horizon, mostly below it, as a city's windows and street lamps; returns image."""
    for _ in range(count):
        add_disc(image, rng.uniform(-180, 180), rng.uniform(-25, 12), rng.uniform(*radius), value=(1.0, 0.97, 0.9))
    return image


def compact_clipped_regions(linear, monkeypatch):
    """How many regions would be sources without the limits on their number and share."""
    import backend.products.hdr as hdr

    with monkeypatch.context() as patch:
        patch.setattr(hdr, "MIN_SOURCE_SHARE", 0.0)
        patch.setattr(hdr, "MAX_SOURCES", 10**6)
        return len(hdr.find_light_sources(linear))


def test_a_city_at_night_has_no_light_source_among_its_many_lights(monkeypatch):
    """150 lights alike: each is a highlight, not a lamp of its own; none is expanded and there is no sun."""
    image = city_lights(np.full((HEIGHT, WIDTH, 3), 0.06), 150, np.random.default_rng(1))
    linear = srgb_to_linear(image)
    assert compact_clipped_regions(linear, monkeypatch) > 100  # each light alone would pass as compact
    result = make_hdr(linear)
    assert result.sources == [] and result.lighting["sources"] == []
    np.testing.assert_array_equal(result.hdr, result.sky)


def test_a_noisy_daylight_texture_has_no_sun(monkeypatch):
    """The issue's case: a busy, bright, noisy image (a random model's kind of output) under a daylight median.
    It used to give 64 sources and a sun lamp about 145 times the sky left in the World; now it has none."""
    from scipy import ndimage

    noise = np.random.default_rng(0).uniform(0.2, 1.15, (HEIGHT, WIDTH, 3))
    image = np.clip((ndimage.uniform_filter(np.clip(noise, 0, 1), size=(3, 3, 1)) - 0.5) * 2.2 + 0.6, 0, 1)
    linear = srgb_to_linear(image)
    assert compact_clipped_regions(linear, monkeypatch) > 64
    result = make_hdr(linear)
    assert result.sources == [] and result.lighting["sources"] == []
    assert result.details["sun"] is None


def test_a_clear_sun_over_many_small_highlights_is_the_one_source_and_its_ratio_counts_the_sky_only():
    """A sun among 60 glints (a sunny town): the sun alone is a source, and its irradiance is sun_ratio times
    what the sky, the World a Sun lamp leaves (panorama_sky.exr), gives a plane facing it."""
    image = city_lights(add_disc(daylight_sky(), -40.0, 35.0, 3.0), 60, np.random.default_rng(2), radius=(0.7, 1.0))
    result = make_hdr(srgb_to_linear(image))
    (sun,) = result.sources
    assert sun.is_sun and (sun.yaw_deg, sun.pitch_deg) == pytest.approx((-40.0, 35.0), abs=1.0)
    sky_irradiance = plane_irradiance(result.sky, sun.direction)
    assert result.lighting["diffuse_irradiance"] == pytest.approx(sky_irradiance, rel=1e-3)
    assert sun.irradiance / sky_irradiance == pytest.approx(6.0, rel=1e-3)


def test_at_most_a_handful_of_sources_the_largest_and_the_sun_against_the_sky_alone():
    """A sun and six lamps (each a fair share of the bright area): the sun and the three largest lamps are
    kept; the lamps' emitters do not count in the sun's diffuse irradiance, so its lamp is sun_ratio times the
    sky's light on it."""
    image = add_disc(daylight_sky(), 60.0, 40.0, 3.0)
    for index, yaw in enumerate((-150.0, -100.0, -50.0, 0.0, 110.0, 160.0)):
        add_disc(image, yaw, -10.0, 1.6 + 0.15 * index)  # growing: the last three are the largest
    result = make_hdr(srgb_to_linear(image), sun_ratio=4.0)
    assert len(result.sources) == MAX_SOURCES == 4
    assert result.sources[0].is_sun and result.sources[0].yaw_deg == pytest.approx(60.0, abs=1.0)
    assert sorted(round(source.yaw_deg) for source in result.sources[1:]) == [0, 110, 160]
    sun = result.sources[0]
    assert sun.irradiance == pytest.approx(4.0 * plane_irradiance(result.sky, sun.direction), rel=1e-3)
    # The lamps were drawn: the HDR image facing the sun has more than the sky besides the sun.
    assert plane_irradiance(result.hdr, sun.direction) > plane_irradiance(result.sky, sun.direction) + sun.irradiance


# ------------------------------------------------------------------ the irradiance ratio, measured


def plane_irradiance(image, normal, weight_mask=None):
    """An independent integration: Σ Y(image)·max(cos, 0)·cos(lat)·Δlon·Δlat over the pixels (of ``weight_mask``)."""
    height, width = image.shape[:2]
    lat = np.pi / 2 - (np.arange(height) + 0.5) / height * np.pi
    solid_angle = np.cos(lat)[:, None] * (2 * np.pi / width) * (np.pi / height)
    weights = np.maximum(directions(height) @ normal, 0) * solid_angle
    if weight_mask is not None:
        weights = weights * weight_mask
    return float(np.einsum("hw,hw->", weights, image @ LUMINANCE_WEIGHTS))


@pytest.mark.parametrize("ratio", [6.0, 3.0])
def test_the_irradiance_ratio_in_lighting_json_matches_an_integration_over_the_exr(tmp_path, ratio):
    png = write_png(tmp_path / "sunny.png", add_disc(daylight_sky(), -50.0, 35.0, 3.0))
    out = tmp_path / "out"
    assert main(["hdr", png, "--out", str(out), "--sun-ratio", str(ratio), "--exposure", "-1"]) == 0
    lighting = json.loads((out / "lighting.json").read_text())
    hdr, sky = read_exr(str(out / "panorama.exr")), read_exr(str(out / "panorama_sky.exr"))
    assert hdr.dtype == np.float32 and sky.max() <= 0.5 + 1e-6 and hdr.max() > 100 * sky.max()  # exposure -1; unclipped
    (sun,) = lighting["sources"]
    normal = lonlat_to_direction(math.radians(sun["yaw_deg"]), math.radians(sun["pitch_deg"]))
    # The disc and halo: the pixels within the halo's outer radius (HALO_WIDTH radii past the disc).
    outer = math.radians(sun["angular_radius_deg"] * (1 + HALO_WIDTH) * 1.05)
    region = directions() @ normal >= math.cos(outer)
    assert np.all(hdr[~region] == sky[~region])  # the sky keeps its values outside
    measured = plane_irradiance(hdr, normal, region) / plane_irradiance(hdr, normal, ~region)
    assert measured == pytest.approx(sun["irradiance_ratio"], rel=0.05)
    assert sun["irradiance_ratio"] == pytest.approx(ratio, rel=1e-6) and lighting["sun_ratio"] == ratio
    # Exactly, as lighting.json defines it: what the emitter adds over the sky, against everything else.
    added = plane_irradiance(hdr - sky, normal) / (np.array(sun["color"]) @ LUMINANCE_WEIGHTS)
    assert added == pytest.approx(sun["irradiance"], rel=1e-3)
    assert plane_irradiance(sky, normal) == pytest.approx(lighting["diffuse_irradiance"], rel=1e-3)
    # The disc pixel is radiance · colour.
    assert hdr.max(axis=(0, 1)) == pytest.approx(sun["radiance"] * np.array(sun["color"]), rel=1e-5)
    assert lighting["exposure_ev"] == -1.0 and lighting["version"] == 1


def test_sun_strength_sets_the_irradiance_and_half_floats_hold_it(tmp_path):
    png = write_png(tmp_path / "sunny.png", add_disc(daylight_sky(), 10.0, 50.0, 0.9))
    out = tmp_path / "out"
    assert main(["hdr", png, "--out", str(out), "--sun-strength", "400", "--half"]) == 0
    lighting = json.loads((out / "lighting.json").read_text())
    assert lighting["sun_ratio"] is None
    assert lighting["sources"][0]["irradiance"] == pytest.approx(400.0, rel=1e-6)
    import OpenEXR

    with OpenEXR.File(str(out / "panorama.exr")) as exr:
        pixels = exr.channels()["RGB"].pixels
    assert pixels.dtype == np.float16 and np.isfinite(pixels).all()
    # The disc was widened to fit below 65504 rather than clipped: the irradiance is still there.
    hdr, sky = pixels.astype(np.float32), read_exr(str(out / "panorama_sky.exr"))
    normal = lonlat_to_direction(math.radians(lighting["sources"][0]["yaw_deg"]), math.radians(lighting["sources"][0]["pitch_deg"]))
    colour_y = np.array(lighting["sources"][0]["color"]) @ LUMINANCE_WEIGHTS
    assert plane_irradiance(hdr - sky, normal) / colour_y == pytest.approx(400.0, rel=0.02)


# ------------------------------------------------------------------ --sun-direction


def test_sun_direction_with_no_source_there_places_one_with_a_warning(tmp_path, capsys):
    png = write_png(tmp_path / "clear.png", daylight_sky())
    out = tmp_path / "out"
    assert main(["hdr", png, "--out", str(out), "--sun-direction=-45,30"]) == 0
    assert "warning: no light source within 10° of --sun-direction -45,30" in capsys.readouterr().err
    (sun,) = json.loads((out / "lighting.json").read_text())["sources"]
    assert sun["placed"] and sun["is_sun"]
    assert (sun["yaw_deg"], sun["pitch_deg"], sun["angular_radius_deg"]) == (-45.0, 30.0, 0.27)
    assert sun["irradiance_ratio"] == pytest.approx(6.0)
    hdr = read_exr(str(out / "panorama.exr"))
    brightest = np.unravel_index(np.argmax(hdr[..., 0]), hdr.shape[:2])
    wanted = lonlat_to_direction(math.radians(-45), math.radians(30))
    assert angular_distance_deg(directions()[brightest], wanted) < 1.0  # a pixel or so at this size


def test_sun_direction_near_a_source_takes_that_source(tmp_path, capsys):
    image = add_disc(daylight_sky(), 30.0, 40.0, 3.0)
    add_disc(image, -90.0, 60.0, 4.0)  # larger, and also above the horizon: the sun without --sun-direction
    linear = srgb_to_linear(image)
    assert make_hdr(linear).sources[0].yaw_deg == pytest.approx(-90.0, abs=1.0)
    result = make_hdr(linear, sun_direction=(36.0, 45.0))
    assert "warning" not in capsys.readouterr().err
    sun = result.sources[0]
    assert sun.is_sun and not sun.placed and len(result.sources) == 2
    assert (sun.yaw_deg, sun.pitch_deg) == pytest.approx((30.0, 40.0), abs=1.0)
    assert not result.sources[1].is_sun


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize("args,message", [
    (["--sun-ratio", "0"], "--sun-ratio must be a number > 0"),
    (["--sun-ratio", "nan"], "--sun-ratio must be a number > 0"),
    (["--sun-strength", "-1"], "--sun-strength must be an irradiance > 0"),
    (["--sun-direction", "10,95"], "pitch 95° is off the sphere"),
    (["--sun-direction=-10,-90.5"], "pitch -90.5° is off the sphere"),
    (["--sun-direction", "inf,3"], "both angles must be finite"),
    (["--sun-direction", "north"], "--sun-direction must be YAW,PITCH"),
    (["--exposure", "99"], "--exposure must be a number of EV"),
])
def test_bad_hdr_values_are_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    png = write_png(tmp_path / "clear.png", daylight_sky())
    out = tmp_path / "out"
    code = main(["hdr", png, "--out", str(out), *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and error.endswith(".")
    assert not out.exists()


def test_bad_hdr_inputs_are_one_sentence_exit_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    wide = write_png(tmp_path / "wide.png", np.full((100, 300, 3), 0.5))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for panorama, message in ((wide, "is 300x100 px; a 360° equirectangular image is twice as wide"),
                              (str(broken), "Could not read the panorama"),
                              (str(tmp_path / "missing.png"), "does not exist")):
        code = main(["hdr", panorama, "--out", str(out)])
        error = capsys.readouterr().err.strip()
        assert code == 2 and message in error and len(error.splitlines()) == 1 and error.endswith(".")
        assert not out.exists()


def test_hdr_files_are_not_replaced_without_overwrite(tmp_path, capsys):
    png = write_png(tmp_path / "clear.png", daylight_sky())
    out = tmp_path / "out"
    out.mkdir()
    (out / "lighting.json").write_text("the user's")
    assert main(["hdr", png, "--out", str(out)]) == 2
    assert "lighting.json already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["lighting.json"]
    assert main(["hdr", png, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["lighting.json", "panorama.exr", "panorama_sky.exr"]


@pytest.mark.parametrize("args,message", [
    (["--sun-ratio", "0"], "--sun-ratio must be a number > 0"),
    (["--sun-direction", "0,-91"], "pitch -91° is off the sphere"),
    (["--no-hdr", "--exposure", "2"], "--exposure sets the HDR lighting that --no-hdr turns off"),
    (["--layout", "wide", "--width", "512", "--height", "128", "--sun-ratio", "3"], "--sun-ratio applies only to --layout equirect"),
])
def test_bad_hdr_values_of_a_generation_are_refused_before_the_model_loads(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    # The model does not even exist: the values are checked first.
    code = main(["generate", "--prompt", "x", "--model", str(tmp_path / "no-model"), "--out", str(out), *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1 and error.endswith(".")
    assert not out.exists()


# ------------------------------------------------------------------ the sun in the views' prompts


def test_the_views_that_see_the_sun_direction_get_the_sun_in_their_prompt():
    from backend.sphere.canvas import Canvas
    from backend.engine.resolve import SUN_PROMPT, view_prompt_rows
    from backend.request import GenerateRequest
    from backend.sphere.view_sets import canvas_views

    views = canvas_views(Canvas("equirect", 32, 64), "band+poles", 16, 8)
    for yaw, pitch in ((100.0, 20.0), (-170.0, 1.0), (0.0, 70.0), (10.0, -89.0)):
        seen = set(views.seeing(yaw, pitch))
        # Crop windows: the canvas pixel holding the direction lies in the window (wrapping in x).
        col, row = int((yaw + 180) / 360 * 64), min(int((90 - pitch) / 180 * 32), 31)
        for index, crop in enumerate(views.crops):
            inside = crop.top <= row < crop.top + crop.height and (col - crop.left) % 64 < crop.width
            assert (index in seen) == inside, (yaw, pitch, index)
        labels = {views.labels[index] for index in seen if index >= len(views.crops)}
        assert labels == ({"U"} if pitch >= 45 else {"D"} if pitch <= -45 else set())
    request = GenerateRequest(prompt="a beach", prompt_up="clear sky", sun_direction=[0.0, 70.0])
    prompts, rows = view_prompt_rows(request, views)
    assert prompts[0] == "a beach"
    assert prompts[rows[views.labels.index("U")]] == f"a beach, clear sky, {SUN_PROMPT}"
    seen = set(views.seeing(0.0, 70.0))
    assert all(prompts[row].endswith(SUN_PROMPT) == (index in seen) for index, row in enumerate(rows))


# ------------------------------------------------------------------ a generation


def test_an_equirect_generation_writes_the_hdr_files_and_no_hdr_writes_none(tiny_model, tmp_path):
    from backend.app.job import check_request, run_job
    from backend.request import GenerateRequest

    def job(out, **extra):
        request = GenerateRequest(prompt="a beach", layout="equirect", width=512, height=256, steps=2, window=16,
                                  stride=8, seed=3, device="cpu", model=tiny_model, out=str(out), **extra)
        return run_job(check_request(request))

    out = tmp_path / "out"
    outputs = job(out, sun_direction="30,40")
    assert outputs["exr_sky"] == str(out / "panorama_sky.exr") and outputs["lighting"] == str(out / "lighting.json")
    lighting = json.loads((out / "lighting.json").read_text())
    assert set(lighting) == {"version", "exposure_ev", "sun_ratio", "diffuse_irradiance", "sources"}
    sun = lighting["sources"][0]
    assert sun["is_sun"] and set(sun) == {"yaw_deg", "pitch_deg", "angular_radius_deg", "color", "radiance",
                                          "irradiance", "irradiance_ratio", "is_sun", "placed"}
    assert angular_distance_deg(lonlat_to_direction(math.radians(sun["yaw_deg"]), math.radians(sun["pitch_deg"])),
                                lonlat_to_direction(math.radians(30), math.radians(40))) <= 10.0 + sun["angular_radius_deg"]
    hdr, sky = read_exr(outputs["exr"]), read_exr(outputs["exr_sky"])
    np.testing.assert_allclose(sky, read_png_linear(outputs["png"]), atol=0.02)  # the float image, linearised
    assert hdr.max() > 10 * sky.max()
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["hdr"]["sources"] == len(lighting["sources"]) and metadata["hdr"]["sun"] is not None
    assert metadata["hdr"]["dynamic_range_after"] > metadata["hdr"]["dynamic_range_before"]
    assert metadata["hdr"]["seconds"] == metadata["timings"]["hdr_s"]
    assert any(prompt.endswith(", the sun") for prompt in metadata["view_prompts"].values())
    assert metadata["params"]["sun_direction"] == [30.0, 40.0]

    # --no-hdr in the same folder (with --overwrite): the plain linearised EXR, the lighting files gone.
    outputs = job(out, no_hdr=True, overwrite=True)
    assert "exr_sky" not in outputs and "lighting" not in outputs
    assert not (out / "panorama_sky.exr").exists() and not (out / "lighting.json").exists()
    assert "hdr" not in json.loads((out / "metadata.json").read_text())
    assert read_exr(outputs["exr"]).max() <= 1.0
