"""The lighting of a HDR World without Blender: blender_addon/core/lighting.py (lighting.json, directions, the Sun
lamp's rotation) and the HDR params generation.generate_params sends (issue #8).

The directions restate blender_addon/scene/world.py's convention, which tests/test_blender_world.py established
by rendering; tests/test_blender_lighting.py renders the lamp and the shadows that follow from them.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from test_addon_generation import backend_request, generation, settings
from syncsphere.blender_addon.core import lighting


def source(**overrides):
    values = dict(yaw_deg=30.0, pitch_deg=40.0, angular_radius_deg=2.5, color=[1.0, 0.9, 0.8], radiance=2000.0,
                  irradiance=9.4, irradiance_ratio=6.0, is_sun=True, placed=False)
    values.update(overrides)
    return values


def lighting_data(*sources, **overrides):
    values = dict(version=1, exposure_ev=0.0, sun_ratio=6.0, diffuse_irradiance=1.57,
                  sources=list(sources) if sources else [source()])
    values.update(overrides)
    return values


# --- lighting.json ---------------------------------------------------------------------------------------


def test_a_lighting_json_is_read_with_its_sun():
    parsed = lighting.parse_lighting(lighting_data(
        source(is_sun=False, yaw_deg=-100.0, irradiance=0.2),
        source(),
        source(yaw_deg=190.0, pitch_deg=-10.0, is_sun=False, placed=True, color=[1, 1, 1])))
    assert (parsed.version, parsed.exposure_ev, parsed.sun_ratio, parsed.diffuse_irradiance) == (1, 0.0, 6.0, 1.57)
    assert len(parsed.sources) == 3
    sun = parsed.sun
    assert sun == parsed.sources[1]
    assert (sun.yaw_deg, sun.pitch_deg, sun.angular_radius_deg, sun.irradiance) == (30.0, 40.0, 2.5, 9.4)
    assert sun.color == (1.0, 0.9, 0.8) and sun.is_sun and not sun.placed
    # A yaw past 180° is the same direction, kept in [-180, 180).
    assert parsed.sources[2].yaw_deg == pytest.approx(-170.0)
    assert all(isinstance(value, float) for value in dataclasses.astuple(sun)[:3])


def test_no_sun_a_null_ratio_and_unknown_keys():
    """A night or overcast sky has no source marked is_sun; sun_ratio may be null (--sun-strength); keys this
    add-on does not know are ignored."""
    parsed = lighting.parse_lighting(lighting_data(source(is_sun=False), source(is_sun=False, yaw_deg=-45.0),
                                                   sun_ratio=None, future_key={"x": 1}))
    assert parsed.sun is None and parsed.sun_ratio is None and len(parsed.sources) == 2
    assert lighting.parse_lighting(lighting_data(sources=[])).sun is None
    # Two suns (the backend marks one, but say it did not): the brighter one lights the scene.
    two = lighting.parse_lighting(lighting_data(source(irradiance=3.0), source(irradiance=5.0, yaw_deg=10.0)))
    assert two.sun.yaw_deg == 10.0


@pytest.mark.parametrize("change,words", [
    (dict(version=2), "version 2"),
    (dict(version=True), "version True"),
    (dict(sources=None), "no list of sources"),
    (dict(exposure_ev="0"), "exposure_ev"),
    (dict(diffuse_irradiance=float("nan")), "diffuse_irradiance"),
    (dict(diffuse_irradiance=-1.0), "outside"),
    (dict(sun_ratio=-2.0), "outside"),
    (dict(sources=[source(pitch_deg=95.0)]), "pitch_deg = 95.0 is outside"),
    (dict(sources=[source(color=[1, 1])]), "colour"),
    (dict(sources=[source(color=[1, -1, 1])]), "colour"),
    (dict(sources=[source(irradiance=True)]), "irradiance"),
    (dict(sources=[source(is_sun=1)]), "is_sun"),
    (dict(sources=[source(placed=None)]), "placed"),
    (dict(sources=["sun"]), "source 1 is not an object"),
])
def test_a_wrong_lighting_json_is_one_sentence(change, words):
    with pytest.raises(lighting.LightingError, match=words) as error:
        lighting.parse_lighting(lighting_data(**change))
    assert str(error.value).endswith((".", ")")) and "\n" not in str(error.value)


def test_read_lighting_from_a_file(tmp_path):
    path = tmp_path / "lighting.json"
    path.write_text(json.dumps(lighting_data()), encoding="utf-8")
    assert lighting.read_lighting(str(path)).sun.yaw_deg == 30.0
    with pytest.raises(lighting.LightingError, match="could not be read"):
        lighting.read_lighting(str(tmp_path / "missing.json"))
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(lighting.LightingError, match="not valid JSON"):
        lighting.read_lighting(str(path))
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(lighting.LightingError, match="does not hold an object"):
        lighting.read_lighting(str(path))


def test_the_lighting_files_are_found_next_to_the_exr_or_named_by_the_outputs(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    exr = job / "panorama.exr"
    exr.write_bytes(b"")
    # No HDR (--no-hdr): neither file.
    assert lighting.lighting_files({"png": str(job / "panorama.png"), "exr": str(exr)}) == (None, None)
    (job / "lighting.json").write_text("{}", encoding="utf-8")
    (job / "panorama_sky.exr").write_bytes(b"")
    # A history item knows only the EXR: the files next to it.
    assert lighting.lighting_files({"exr": str(exr)}) == (str(job / "lighting.json"), str(job / "panorama_sky.exr"))
    # The done event's own paths win; a named path that is not a file counts as absent.
    other = tmp_path / "elsewhere.json"
    other.write_text("{}", encoding="utf-8")
    assert lighting.lighting_files({"exr": str(exr), "lighting": str(other), "exr_sky": str(tmp_path / "gone.exr")}) \
        == (str(other), None)
    assert lighting.lighting_files({"exr": ""}) == (None, None)


# --- directions ------------------------------------------------------------------------------------------


def _rotation_matrix(euler):
    """Blender's Euler XYZ: rotate about X, then Y, then Z (extrinsic): Rz @ Ry @ Rx."""
    x, y, z = euler
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize("yaw,pitch,rotation,expected", [
    (0, 0, 0, (1, 0, 0)),          # the image centre faces world +X
    (90, 0, 0, (0, -1, 0)),        # yaw +90° (turning right) is world -Y
    (-90, 0, 0, (0, 1, 0)),
    (180, 0, 0, (-1, 0, 0)),       # the seam is behind, along -X
    (0, 90, 0, (0, 0, 1)),         # the top row looks up
    (0, -90, 0, (0, 0, -1)),
    (0, 0, math.pi / 2, (0, -1, 0)),  # Mapping rotation r puts the image centre at azimuth -r
    (30, 0, math.radians(-30), (1, 0, 0)),
])
def test_image_directions_in_the_world(yaw, pitch, rotation, expected):
    np.testing.assert_allclose(lighting.world_direction(yaw, pitch, rotation), expected, atol=1e-12)


def test_the_sun_lamp_shines_from_the_source():
    """The lamp's local +Z points at the source and its light (local -Z) travels away from it, for any
    direction and World rotation; only its Z angle depends on the rotation."""
    rng = np.random.default_rng(3)
    for yaw, pitch, rotation in zip(rng.uniform(-180, 180, 50), rng.uniform(-90, 90, 50), rng.uniform(-7, 7, 50)):
        euler = lighting.sun_lamp_rotation(yaw, pitch, rotation)
        matrix = _rotation_matrix(euler)
        towards = np.array(lighting.world_direction(yaw, pitch, rotation))
        np.testing.assert_allclose(matrix @ [0, 0, 1], towards, atol=1e-12)
        np.testing.assert_allclose(matrix @ [0, 0, -1], -towards, atol=1e-12)
        assert euler[:2] == lighting.sun_lamp_rotation(yaw, pitch, 0.0)[:2]
        assert euler[2] == pytest.approx(lighting.world_azimuth(yaw, rotation))
    # The example: yaw 30°, pitch 40°, no rotation: from azimuth -30°, 40° up.
    assert lighting.sun_lamp_rotation(30, 40) == pytest.approx((0.0, math.radians(50), math.radians(-30)))


def test_the_sun_lamps_size_and_strength():
    assert lighting.sun_lamp_angle(0.25) == pytest.approx(math.radians(0.5))
    assert lighting.sun_lamp_angle(3.0) == pytest.approx(math.radians(6.0))
    assert lighting.sun_lamp_angle(120.0) == pytest.approx(math.pi)  # Blender's Sun angle stops at 180°
    assert lighting.sun_lamp_strength(9.5) == 9.5
    assert lighting.sun_lamp_strength(9.5, 0.5) == 4.75


def test_the_sun_lamp_is_sun_ratio_times_the_world_it_leaves(tmp_path):
    """The backend's lighting.json read by the add-on: a Sun lamp of ``sun_lamp_strength`` (World strength 1)
    gives a plane facing the sun ``sun_ratio`` times the irradiance of the World the lamp mode leaves, the sky
    image panorama_sky.exr (the other lamps' emitters are not in it and do not count)."""
    from backend.app.cli import main
    from backend.products.images import read_exr
    from backend.sphere.geometry import lonlat_to_direction
    from test_hdr import add_disc, daylight_sky, plane_irradiance, write_png

    image = add_disc(daylight_sky(), 60.0, 40.0, 3.0)
    for yaw in (-120.0, 0.0, 120.0):
        add_disc(image, yaw, 5.0, 2.0)  # three lamps near the horizon, on the sun's side of the sky too
    out = tmp_path / "out"
    assert main(["hdr", write_png(tmp_path / "sunny.png", image), "--out", str(out), "--sun-ratio", "5"]) == 0
    result = lighting.read_lighting(str(out / lighting.LIGHTING_FILE))
    assert len(result.sources) == 4
    sun = result.sun
    facing_sun = lonlat_to_direction(math.radians(sun.yaw_deg), math.radians(sun.pitch_deg))
    world_left = plane_irradiance(read_exr(str(out / lighting.SKY_EXR_FILE)), facing_sun)
    assert lighting.sun_lamp_strength(sun.irradiance) / world_left == pytest.approx(5.0, rel=2e-3)
    assert sun.irradiance_ratio == pytest.approx(5.0)


# --- what a Generate press sends -------------------------------------------------------------------------


HDR_PARAMS = ("no_hdr", "exposure", "sun_ratio", "sun_direction")


def hdr_params(**overrides):
    params = generation.generate_params(settings(**overrides), 42, model="some/model", device="cpu")
    return {name: params[name] for name in HDR_PARAMS if name in params}


def test_the_backends_defaults_send_nothing():
    assert hdr_params() == {}
    # What the panel shows is what goes: the defaults of the properties are the backend's.
    from backend.request import GenerateRequest

    backend = GenerateRequest(prompt="x")
    assert (generation.DEFAULT_EXPOSURE, generation.DEFAULT_SUN_RATIO) == (backend.exposure, backend.sun_ratio)


def test_hdr_params_are_sent_when_they_differ_from_the_defaults():
    assert hdr_params(exposure=-1.5) == {"exposure": -1.5}
    assert hdr_params(sun_ratio=10.0) == {"sun_ratio": 10.0}
    # Blender's single-precision floats are sent as the value the artist typed.
    assert hdr_params(exposure=float(np.float32(0.3)), sun_ratio=float(np.float32(2.2))) == \
        {"exposure": 0.3, "sun_ratio": 2.2}
    assert hdr_params(exposure=float(np.float32(-0.00001))) == {}  # rounds to 0: the default
    params = hdr_params(use_sun_direction=True, sun_yaw=30.0, sun_pitch=40.0)
    assert params == {"sun_direction": "30,40"}
    assert hdr_params(use_sun_direction=True, sun_yaw=float(np.float32(-12.3)), sun_pitch=7.25) == \
        {"sun_direction": "-12.3,7.25"}
    assert hdr_params(use_sun_direction=True, sun_yaw=-0.0, sun_pitch=90.0) == {"sun_direction": "0,90"}
    assert hdr_params(use_sun_direction=True, sun_yaw=123.45678, sun_pitch=-89.99999) == \
        {"sun_direction": "123.4568,-90"}
    # The yaw and pitch are not sent while Sun Direction is off.
    assert hdr_params(sun_yaw=50.0, sun_pitch=10.0) == {}
    assert all(type(value) is float for value in hdr_params(exposure=1.0, sun_ratio=3.0).values())


def test_hdr_off_sends_no_hdr_and_only_the_direction():
    """Without HDR, exposure and ratio mean nothing (the backend refuses them with --no-hdr); the direction
    still asks the views that see it for the sun."""
    assert hdr_params(hdr=False) == {"no_hdr": True}
    assert hdr_params(hdr=False, exposure=2.0, sun_ratio=3.0) == {"no_hdr": True}
    assert hdr_params(hdr=False, exposure=2.0, use_sun_direction=True, sun_yaw=10.0, sun_pitch=20.0) == \
        {"no_hdr": True, "sun_direction": "10,20"}


@pytest.mark.parametrize("mode", ["TILE", "WIDE"])
def test_hdr_params_are_for_a_360_world_only(mode):
    assert hdr_params(mode=mode, hdr=False, exposure=2.0, sun_ratio=3.0, use_sun_direction=True) == {}


def test_the_backend_accepts_what_is_sent(tmp_path):
    """Each kind of HDR params validates as the worker validates a generate request (once the backend has
    them: until then this says so and checks nothing)."""
    from backend.request import GenerateRequest

    assert set(HDR_PARAMS) <= {field.name for field in dataclasses.fields(GenerateRequest)}
    for overrides in (dict(), dict(hdr=False), dict(exposure=-1.5, sun_ratio=10.0),
                      dict(use_sun_direction=True, sun_yaw=-12.5, sun_pitch=40.0),
                      dict(hdr=False, exposure=3.0, use_sun_direction=True, sun_yaw=200.0, sun_pitch=-90.0)):
        params = generation.generate_params(settings(**overrides), 42, model="some/model", device="cpu")
        request = backend_request(params, tmp_path)
        assert request.no_hdr is (not settings(**overrides).hdr)
        for name in ("exposure", "sun_ratio"):
            assert getattr(request, name) == params.get(name, getattr(generation, f"DEFAULT_{name.upper()}"))
        if "sun_direction" in params:  # read as [yaw, pitch], yaw wrapped into [-180, 180)
            yaw, pitch = map(float, params["sun_direction"].split(","))
            assert request.sun_direction == [(yaw + 180) % 360 - 180, pitch]
        else:
            assert request.sun_direction is None
