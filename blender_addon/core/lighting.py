"""The lighting of a HDR World (issue #8), as plain Python (no bpy), so it is tested without Blender.

A 360° World generated with HDR comes with two more files next to its ``panorama.exr``: ``lighting.json``
(the light sources the backend found or placed, see ``parse_lighting``) and ``panorama_sky.exr`` (the same
image with the sun's disc lowered to sky level). This module reads and checks ``lighting.json``, finds those
files for a job's outputs, and turns a source's direction in the image into a direction in the Blender
World and into the rotation of a Sun lamp that shines from it. ``world.py`` builds the nodes and the lamp.

Directions (blender_addon/scene/world.py's module docstring, established by the renders of
tests/test_blender_world.py and checked for the lamp by tests/test_blender_lighting.py): an image direction
(yaw, pitch) of docs/conventions.md#directions (yaw positive turns right from the image centre, pitch positive looks up)
lies, with the World's Mapping Z rotation ``r``, at world azimuth ``atan2(y, x) = -yaw - r`` and elevation
``pitch``. A Blender Sun light shines along its local -Z, so a lamp lighting the scene *from* that
direction has its local +Z along it: Euler XYZ ``(0, pi/2 - pitch, -yaw - r)``. Only the last angle depends
on the World's rotation, which is why a driver on it alone keeps the lamp with a rotated World.
"""

import json
import math
import os
from dataclasses import dataclass

# The files a HDR World job writes next to panorama.exr (the backend's names).
LIGHTING_FILE = "lighting.json"
SKY_EXR_FILE = "panorama_sky.exr"
# The lighting.json versions this add-on reads.
LIGHTING_VERSIONS = (1,)

# How a Sun of the lighting lights the scene (properties.SUN_MODE_ITEMS).
SUN_LAMP = "SUN_LAMP"
IN_TEXTURE = "IN_TEXTURE"


class LightingError(ValueError):
    """lighting.json is missing, unreadable or not what the backend writes; ``str()`` is one sentence."""


@dataclass(frozen=True)
class Source:
    """One light source of the panorama, as lighting.json lists it.

    yaw_deg, pitch_deg: its direction in the image (docs/conventions.md#directions). angular_radius_deg: its disc's
    angular radius. color: linear RGB, largest component 1. radiance: the disc's radiance. irradiance: the
    direct irradiance it gives a plane facing it, in the EXR's units (a uniform sky of value 1 gives pi).
    irradiance_ratio: that over the diffuse irradiance. is_sun: the sun (at most one is used as such).
    placed: put there because it was asked for (``sun_direction``), not found in the image.
    """

    yaw_deg: float
    pitch_deg: float
    angular_radius_deg: float
    color: tuple
    radiance: float
    irradiance: float
    irradiance_ratio: float
    is_sun: bool
    placed: bool


@dataclass(frozen=True)
class Lighting:
    """lighting.json: the exposure (EV), the requested sun ratio (None when none applied), the diffuse
    irradiance of the sky, and the sources."""

    version: int
    exposure_ev: float
    sun_ratio: object  # float or None
    diffuse_irradiance: float
    sources: tuple

    @property
    def sun(self):
        """The sun: the source marked is_sun (the brightest if several are), or None for a sunless sky."""
        suns = [source for source in self.sources if source.is_sun]
        return max(suns, key=lambda source: source.irradiance) if suns else None


def _number(data, key, where, *, minimum=None, maximum=None, optional=False):
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LightingError(f"{where} has no number {key!r} (it has {value!r}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise LightingError(f"{where}: {key} = {value!r} is outside {minimum}..{maximum}.")
    return float(value)


def _flag(data, key, where):
    value = data.get(key)
    if not isinstance(value, bool):
        raise LightingError(f"{where} has no true/false {key!r} (it has {value!r}).")
    return value


def parse_source(data, where="a light source"):
    """A ``Source`` from one entry of lighting.json's ``sources``; raises LightingError when it is not one."""
    if not isinstance(data, dict):
        raise LightingError(f"{where} is not an object.")
    color = data.get("color")
    if (not isinstance(color, (list, tuple)) or len(color) != 3
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                       for c in color)):
        raise LightingError(f"{where} has no colour of three non-negative numbers (it has {color!r}).")
    return Source(
        # Any finite yaw is a direction; keep it in [-180, 180).
        yaw_deg=(_number(data, "yaw_deg", where) + 180.0) % 360.0 - 180.0,
        pitch_deg=_number(data, "pitch_deg", where, minimum=-90.0, maximum=90.0),
        angular_radius_deg=_number(data, "angular_radius_deg", where, minimum=0.0, maximum=180.0),
        color=tuple(float(c) for c in color),
        radiance=_number(data, "radiance", where, minimum=0.0),
        irradiance=_number(data, "irradiance", where, minimum=0.0),
        irradiance_ratio=_number(data, "irradiance_ratio", where, minimum=0.0),
        is_sun=_flag(data, "is_sun", where),
        placed=_flag(data, "placed", where),
    )


def parse_lighting(data):
    """A ``Lighting`` from lighting.json's decoded content (a dict); raises LightingError when it is not one.

    The format (written by the backend): ``{"version": 1, "exposure_ev": float, "sun_ratio": float | null,
    "diffuse_irradiance": float, "sources": [source, ...]}``, each source ``{"yaw_deg", "pitch_deg",
    "angular_radius_deg", "color": [r, g, b], "radiance", "irradiance", "irradiance_ratio", "is_sun",
    "placed"}`` (``Source``). Keys this add-on does not know are ignored.
    """
    if not isinstance(data, dict):
        raise LightingError("lighting.json does not hold an object.")
    version = data.get("version")
    if version not in LIGHTING_VERSIONS or isinstance(version, bool):
        raise LightingError(f"lighting.json has version {version!r}; this add-on reads version "
                            f"{', '.join(map(str, LIGHTING_VERSIONS))} (update SyncSphere).")
    sources = data.get("sources")
    if not isinstance(sources, list):
        raise LightingError(f"lighting.json has no list of sources (it has {sources!r}).")
    return Lighting(
        version=version,
        exposure_ev=_number(data, "exposure_ev", "lighting.json"),
        sun_ratio=_number(data, "sun_ratio", "lighting.json", minimum=0.0, optional=True),
        diffuse_irradiance=_number(data, "diffuse_irradiance", "lighting.json", minimum=0.0),
        sources=tuple(parse_source(source, f"lighting.json's source {index + 1}")
                      for index, source in enumerate(sources)),
    )


def read_lighting(path):
    """Read and check the lighting.json at ``path``; returns a ``Lighting``. Raises LightingError (one
    sentence) when the file cannot be read or is not valid."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise LightingError(f"{path} could not be read ({error.strerror or error}).") from None
    except ValueError as error:
        raise LightingError(f"{path} is not valid JSON ({error}).") from None
    return parse_lighting(data)


def lighting_files(outputs):
    """(lighting.json, panorama_sky.exr) paths of a job's ``outputs`` ({"exr": path, ...}), each None when absent.

    Taken from ``outputs["lighting"]`` / ``outputs["exr_sky"]`` when the done event names them, else looked
    for next to the EXR: a history item only remembers the EXR, and the backend writes all three into the
    job's folder. A path that is not an existing file counts as absent (no HDR, or the files were removed).
    """
    folder = os.path.dirname(outputs.get("exr") or "")

    def find(key, name):
        path = outputs.get(key) or (os.path.join(folder, name) if folder else None)
        return path if path and os.path.isfile(path) else None

    return find("lighting", LIGHTING_FILE), find("exr_sky", SKY_EXR_FILE)


def world_azimuth(yaw_deg, rotation):
    """World azimuth atan2(y, x) (radians, not wrapped) of image yaw ``yaw_deg`` under Mapping Z rotation
    ``rotation`` (radians): ``-yaw - rotation`` (module docstring)."""
    return -math.radians(yaw_deg) - rotation


def world_direction(yaw_deg, pitch_deg, rotation=0.0):
    """The unit vector (x, y, z) in the Blender World towards image direction (yaw, pitch) in degrees, with
    the World's Mapping Z rotation ``rotation`` (radians)."""
    azimuth, pitch = world_azimuth(yaw_deg, rotation), math.radians(pitch_deg)
    return (math.cos(pitch) * math.cos(azimuth), math.cos(pitch) * math.sin(azimuth), math.sin(pitch))


def sun_lamp_rotation(yaw_deg, pitch_deg, rotation=0.0):
    """Euler XYZ angles (radians) of a Sun lamp that shines *from* image direction (yaw, pitch) (degrees)
    under the World's Mapping Z rotation ``rotation`` (radians): its local +Z points at the source, so its
    light travels along local -Z, away from it. ``(0, pi/2 - pitch, -yaw - rotation)``."""
    return (0.0, math.pi / 2 - math.radians(pitch_deg), world_azimuth(yaw_deg, rotation))


def sun_lamp_angle(angular_radius_deg):
    """A Sun lamp's angle (its disc's angular diameter, radians) for a source of that angular radius,
    at most 180° (Blender's limit)."""
    return min(2.0 * math.radians(angular_radius_deg), math.pi)


def sun_lamp_strength(irradiance, world_strength=1.0):
    """A Sun lamp's strength for a source of that direct ``irradiance`` under the World's Background
    strength. Blender's Sun strength is the irradiance it gives a plane facing it, in the same units as the
    World's values (a uniform World of 1 gives pi; measured by tests/test_blender_lighting.py)."""
    return irradiance * world_strength
