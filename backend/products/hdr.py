"""Lighting-grade HDR from an 8-bit 360° panorama (issue #8): a real sun, measured, and lighting.json.

A diffusion model paints the sun as a white disc clipped at 1.0, no brighter than a white cloud. This
module turns an equirect panorama into an HDR environment that lights a scene like the sky it shows:

1. **Linearise**: inverse sRGB (``images.srgb_to_linear``) into scene-linear RGB, times 2^``exposure``.
   This is the *sky* image (``panorama_sky.exr``); the sky keeps these values everywhere.
2. **Find the light sources** (``find_light_sources``): connected regions of near-saturated pixels on the
   sphere, measured in solid angle and connected across the ±180° seam and across the poles, that are
   *compact* (``is_compact``): small (at most a cap of ``MAX_SOURCE_RADIUS_DEG``) and round enough. Each
   has a direction, an angular radius (of the cap with the same solid angle) and a colour. Only a few can
   be lights: at most ``MAX_SOURCES``, each with ``MIN_SOURCE_SHARE`` of all such regions' solid angle, so
   an image busy with small highlights (city lights, glitter, noise) has none. The sun
   (``choose_sun``) is the largest source above the horizon, in a daylight sky only; ``--sun-direction``
   names it, or places one where none was found.
3. **Expand** each source into an emitter (``expand_sources``): a disc of radiance L·colour with a smooth
   halo into the sky, L solved so that the sun's irradiance on a plane facing it is ``sun_ratio`` times
   the irradiance the sky left without the emitters gives that plane (or ``sun_strength``, in EXR units).

Conventions (``backend/sphere/geometry.py``, docs/conventions.md#directions): equirect column j at longitude
``(j + 0.5) / W · 360° − 180°``, row i at latitude ``90° − (i + 0.5) / H · 180°``; yaw = longitude
(positive turns right), pitch = latitude (positive up); directions (x right, y up, z forward).

Units: images are linear RGB "EXR units": a uniform sky of value 1 gives a plane irradiance π. Scalars
(irradiance, diffuse irradiance, dynamic range) are Rec. 709 luminance Y of RGB quantities; a source's
``irradiance`` is Y(its RGB irradiance) / Y(its colour), so that ``irradiance · colour`` is its RGB
irradiance (matched in luminance): the strength and colour of a Sun lamp that replaces it.

No torch: numpy, scipy (connected components) and OpenEXR.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadRequest, SyncSphereError
from ..request import DEFAULT_SUN_RATIO, check_hdr_options
from ..sphere.geometry import (direction_to_lonlat, equirect_latitude, equirect_longitude, equirect_to_direction,
                               lonlat_to_direction)
from . import images
from .files import check_output_folder, write_files_atomically

HDR_OUTPUT_NAMES = ("panorama.exr", "panorama_sky.exr", "lighting.json")
"""The files of ``python -m backend hdr``, which an equirect job writes too (panorama.exr then holds the HDR image)."""

LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722])
"""Rec. 709 / sRGB luminance Y of linear RGB."""

SATURATION_LUMINANCE = 0.85
"""A pixel is near-saturated when its linear luminance (before exposure) is at least this: a grey of
237/255, a white, or a pale warm core such as 255/240/200 clipped by the 8-bit range. Bright but
colourful pixels (a yellow coat, 255/220/0: Y 0.73) are not: a clipped light source clips in every channel."""

CLIPPED_CHANNEL = 0.98
"""A source's brightest pixel reaches the 8-bit ceiling in at least one channel (linear 0.98, sRGB 252/255):
a light source clips. The top of a smooth bright gradient (an overcast sky peaking at 242/255 at the zenith)
is near-saturated but never clips, and is sky, however compact."""

MIN_SOURCE_PIXELS = 4
"""A source has at least this many pixels (a 2 x 2 block): single clipped pixels are noise or sparkle."""

MAX_SOURCE_RADIUS_DEG = 20.0
"""A source covers at most a cap of this angular radius (0.38 sr, 3 % of the sphere). A painted sun with
its glare stays below it; a bright overcast, a white cloud bank or a snow field is larger and is sky."""

COMPACTNESS = 2.5
"""A source reaches no farther from its centre than this many equal-area radii (plus one pixel): a disc
reaches 1, a half-hidden sun about 1.1, a 1:8 strip 2.5. Thin lines (a bright horizon, a white rim) are
not light sources."""

DAYLIGHT_SKY_LUMINANCE = 0.033
"""A source can be the sun only under a daylight sky: the median linear luminance of the upper
hemisphere is at least this (an sRGB grey of 0.2; a dusk sky 40/60/110 has 0.048, a night sky 10/15/30
0.005). The sun lights the sky it is in, so a clipped disc in a dark sky is a lamp or the moon."""

SUN_MATCH_DEG = 10.0
"""``--sun-direction`` picks a detected source whose disc comes within this many degrees of it."""

SUN_ANGULAR_RADIUS_DEG = 0.27
"""Angular radius of a placed sun: the real sun's (0.53° across)."""

PLACED_SUN_COLOR = (1.0, 0.97, 0.92)
"""Linear colour of a placed sun: white with a slight warmth (max component 1)."""

HALO_WIDTH = 1.0
"""Width of an emitter's soft halo, in disc radii: the profile falls from 1 to 0 over [r, r + HALO_WIDTH·r]."""

MAX_SOURCES = 4
"""At most this many sources are kept, the largest ones: a scene is lit by a sun and a few lamps; more
bright spots (city lights, glitter on water, a noisy texture) are highlights, not lighting."""

MIN_SOURCE_SHARE = 0.1
"""A source has at least this share of the solid angle of all compact clipped regions of the image. A sun
among glints keeps nearly all of it; one of 200 city lights, or of a noisy texture's hundreds of clipped
specks, has under 1 % and is not a light of its own (``find_light_sources``)."""

HALF_MAX = 65504.0
"""The largest finite half-float value: with ``half`` a disc is widened until its radiance fits below it."""


@dataclass
class LightSource:
    """One light source on the sphere.

    ``yaw_deg``, ``pitch_deg``: its direction (docs/conventions.md#directions). ``angular_radius_deg``: radius of
    the cap with its solid angle (the disc a Sun lamp's angle should have). ``color``: linear RGB, max component 1.
    ``solid_angle``: steradians of its core (the detected pixels; a placed sun's cap). ``pixels``: how many
    detected pixels (0 when placed). After ``expand_sources``: ``radiance`` (disc pixel = radiance ·
    colour, EXR units), ``irradiance`` (added irradiance on a plane facing it, ``irradiance · colour`` in
    luminance), ``render_radius_deg`` (the disc actually drawn: at least a pixel, wider with ``half``).
    """

    yaw_deg: float
    pitch_deg: float
    angular_radius_deg: float
    color: tuple[float, float, float]
    solid_angle: float
    pixels: int = 0
    is_sun: bool = False
    placed: bool = False
    radiance: float = 0.0
    irradiance: float = 0.0
    render_radius_deg: float = 0.0

    @property
    def direction(self) -> np.ndarray:
        """Unit direction (3,) float64, (x right, y up, z forward)."""
        return lonlat_to_direction(math.radians(self.yaw_deg), math.radians(self.pitch_deg))


@dataclass
class HdrResult:
    """What ``make_hdr`` returns. ``hdr``: (H, W, 3) float32 linear, the sky plus every emitter (panorama.exr).
    ``sky``: (H, W, 3) float32 linear, the linearised image times 2^exposure (panorama_sky.exr).
    ``lighting``: the lighting.json dict. ``sources``: the expanded sources, the sun first. ``details``: what
    metadata.json records under "hdr". ``warnings``: sentences already printed to stderr."""

    hdr: np.ndarray
    sky: np.ndarray
    lighting: dict
    sources: list[LightSource]
    details: dict
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ sphere measures


def pixel_solid_angles(height: int, width: int) -> np.ndarray:
    """Solid angle in steradians of one pixel of each row of an H x W equirect, (H,) float64.

    A pixel spans Δlon = 2π/W and the latitudes lat ± Δlat/2 (Δlat = π/H): its area on the unit sphere is
    exactly Δlon·(sin(lat + Δlat/2) − sin(lat − Δlat/2)) = 2·Δlon·cos(lat)·sin(Δlat/2), which is
    cos(lat)·Δlon·Δlat to second order; the rows sum to exactly 4π.
    """
    lat = equirect_latitude(np.arange(height), height)
    return 2.0 * (2.0 * np.pi / width) * np.cos(lat) * np.sin(np.pi / height / 2.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luminance Y of linear RGB (..., 3): (...)."""
    return np.asarray(rgb, np.float32) @ LUMINANCE_WEIGHTS.astype(np.float32)


def cap_solid_angle(radius: float) -> float:
    """Solid angle in steradians of the spherical cap of angular radius ``radius`` (radians): 2π(1 − cos r)."""
    return 2.0 * math.pi * (1.0 - math.cos(radius))


def cap_radius(solid_angle: float) -> float:
    """Angular radius in radians of the spherical cap of ``solid_angle`` sr (``cap_solid_angle``'s inverse)."""
    return math.acos(min(1.0, max(-1.0, 1.0 - solid_angle / (2.0 * math.pi))))


def cosine_map(height: int, width: int, normal: np.ndarray) -> np.ndarray:
    """cos of the angle between every pixel centre's direction and the unit ``normal`` (3,): (H, W) float32.

    Separable (d = (cos lat sin lon, sin lat, cos lat cos lon)), so no (H, W, 3) array is made.
    """
    lat, lon = equirect_latitude(np.arange(height), height), equirect_longitude(np.arange(width), width)
    horizontal = np.sin(lon) * normal[0] + np.cos(lon) * normal[2]  # (W,)
    return (np.cos(lat)[:, None] * horizontal[None, :] + (np.sin(lat) * normal[1])[:, None]).astype(np.float32)


def plane_irradiance(image: np.ndarray, normal) -> np.ndarray:
    """RGB irradiance (3,) float64 that the equirect ``image`` (H, W, 3), linear radiance, gives a plane
    facing the unit direction ``normal``: Σ image · max(cos θ, 0) · pixel solid angle (a uniform sky of 1
    gives π)."""
    height, width = image.shape[:2]
    weights = np.maximum(cosine_map(height, width, np.asarray(normal, np.float64)), 0.0)
    weights *= pixel_solid_angles(height, width).astype(np.float32)[:, None]
    # One float32 dot product per row (BLAS), the rows summed in float64: float32 over a whole 8 Mpx image
    # would lose about 1e-4.
    rows = np.matmul(weights[:, None, :], image.astype(np.float32, copy=False))[:, 0, :]
    return rows.sum(axis=0, dtype=np.float64)


def downsampled(image: np.ndarray, min_rows: int = 128) -> np.ndarray:
    """``image`` (H, W, C) averaged over f x f blocks, f the largest power of two with H/f >= ``min_rows``
    that divides H and W: a cheap grid for smooth integrals such as a sky's irradiance."""
    height, width = image.shape[:2]
    factor = 1
    while height // (factor * 2) >= min_rows and height % (factor * 2) == 0 and width % (factor * 2) == 0:
        factor *= 2
    if factor == 1:
        return image
    return image.reshape(height // factor, factor, width // factor, factor, -1).mean(axis=(1, 3))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of ``values`` (N,) where each counts with its weight (N,) >= 0 (e.g. solid angle)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    if cumulative[-1] <= 0:
        return 0.0
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def median_luminance(image: np.ndarray, upper_only: bool = False) -> float:
    """Solid-angle-weighted median luminance of an equirect ``image`` (H, W, 3) linear (``upper_only``: of the
    upper hemisphere). Read on a strided grid of at most about 256 rows: a median needs no more."""
    step = max(1, image.shape[0] // 256)
    sample = image[step // 2::step, step // 2::step]
    rows = np.nonzero(np.arange(image.shape[0])[step // 2::step] < image.shape[0] / 2)[0] if upper_only else slice(None)
    weights = np.broadcast_to(pixel_solid_angles(*image.shape[:2])[step // 2::step][:, None], sample.shape[:2])
    return weighted_median(luminance(sample[rows]).reshape(-1), weights[rows].reshape(-1))


def dynamic_range(image: np.ndarray) -> float | None:
    """max / median luminance of an equirect ``image`` (H, W, 3) linear; None for a black median."""
    median = median_luminance(image)
    return float(luminance(image).max() / median) if median > 0 else None


# ------------------------------------------------------------------ finding the sources


def label_on_sphere(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a bool equirect ``mask`` (H, W), W even: (labels (H, W) int32, count).

    8-connected within the image (``scipy.ndimage.label``), and also across the ±180° seam (column W−1 next
    to column 0) and across each pole (a top-row pixel next to the top-row pixels half a turn round,
    ``geometry.equirect_padding_indices``' neighbours). Labels are 1 … count, 0 outside the mask.
    """
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return labels.astype(np.int32), 0
    height, width = mask.shape
    pairs = []
    for shift in (-1, 0, 1):  # across the seam: (i, W−1) touches (i + shift, 0)
        rows = np.arange(max(0, -shift), min(height, height - shift))
        pairs.append(np.stack([labels[rows, width - 1], labels[rows + shift, 0]], axis=1))
    cols = np.arange(width)
    for row in (0, height - 1):  # across a pole: (row, j) touches (row, j + W/2 + shift)
        for shift in (-1, 0, 1):
            pairs.append(np.stack([labels[row, cols], labels[row, (cols + width // 2 + shift) % width]], axis=1))
    pairs = np.concatenate(pairs)
    pairs = np.unique(pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0) & (pairs[:, 0] != pairs[:, 1])], axis=0)
    if len(pairs) == 0:
        return labels.astype(np.int32), count
    parent = np.arange(count + 1)

    def root(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    for a, b in pairs:  # a few per seam row and pole column: a plain union-find
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.arange(count + 1)
    for label in np.unique(pairs):
        roots[label] = root(label)
    kept, compact = np.unique(roots, return_inverse=True)  # roots[0] == 0 stays 0
    return compact[labels].astype(np.int32), len(kept) - 1


def is_compact(solid_angle: float, extent: float, pixel_angle: float, pixels: int) -> bool:
    """Whether a bright region is a light source rather than bright sky: at least ``MIN_SOURCE_PIXELS``
    pixels, a solid angle (sr) of at most the ``MAX_SOURCE_RADIUS_DEG`` cap, and no pixel centre farther
    than ``COMPACTNESS`` equal-area radii plus one pixel (``pixel_angle``, radians) from its centre
    (``extent``, radians)."""
    if pixels < MIN_SOURCE_PIXELS:
        return False
    if solid_angle > cap_solid_angle(math.radians(MAX_SOURCE_RADIUS_DEG)):
        return False
    return extent <= COMPACTNESS * cap_radius(solid_angle) + pixel_angle


def find_light_sources(linear: np.ndarray) -> list[LightSource]:
    """The light sources of an equirect image: compact connected regions of near-saturated pixels.

    ``linear``: (H, 2H, 3) scene-linear RGB *before* exposure (the inverse sRGB of the 8-bit image, so that
    1.0 is the clip level). A pixel is near-saturated when its luminance is at least
    ``SATURATION_LUMINANCE``; regions connect across the seam and the poles (``label_on_sphere``) and are
    kept when their brightest pixel clips (``CLIPPED_CHANNEL``) and they are ``is_compact``. For each: solid angle Ω = Σ pixel solid angles; direction = the normalised
    solid-angle-weighted mean of its pixels' directions; angular radius = that of the cap of solid angle Ω
    (acos(1 − Ω/2π)); colour = its solid-angle-weighted mean linear RGB scaled to max component 1.
    Only what can be a light is returned (``lights_among``), largest solid angle first; none are the sun yet
    (``choose_sun``).
    """
    height, width = linear.shape[:2]
    labels, count = label_on_sphere(luminance(linear) >= SATURATION_LUMINANCE)
    if count == 0:
        return []
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    weights = pixel_solid_angles(height, width)[rows]
    solid_angles = np.bincount(ids, weights, count + 1)
    pixel_counts = np.bincount(ids, minlength=count + 1)
    # Only regions that may pass is_compact's size limits get directions computed: an overcast sky's huge
    # bright region is dropped here, before any per-pixel direction is made for it.
    limit = cap_solid_angle(math.radians(MAX_SOURCE_RADIUS_DEG))
    candidate = (solid_angles <= limit) & (pixel_counts >= MIN_SOURCE_PIXELS)
    candidate[0] = False
    keep = candidate[ids]
    rows, cols, ids, weights = rows[keep], cols[keep], ids[keep], weights[keep]
    if len(ids) == 0:
        return []
    directions = equirect_to_direction(cols, rows, width, height)
    sums = np.stack([np.bincount(ids, weights * directions[:, axis], count + 1) for axis in range(3)], axis=1)
    norms = np.linalg.norm(sums, axis=1)
    means = sums / np.where(norms > 0, norms, 1.0)[:, None]
    cosines = np.einsum("ij,ij->i", directions, means[ids])
    lowest = np.ones(count + 1)
    np.minimum.at(lowest, ids, cosines)  # the farthest pixel of each region from its centre
    colours = linear[rows, cols].astype(np.float64)
    peaks = np.zeros(count + 1)
    np.maximum.at(peaks, ids, colours.max(axis=1))  # each region's brightest channel value
    colour_sums = np.stack([np.bincount(ids, weights * colours[:, ch], count + 1) for ch in range(3)], axis=1)
    pixel_angle = np.pi / height  # a pixel's height; its width is never larger (cos lat <= 1)
    sources = []
    for label in np.nonzero(candidate)[0]:
        extent = math.acos(min(1.0, max(-1.0, lowest[label])))
        if norms[label] <= 0 or peaks[label] < CLIPPED_CHANNEL:
            continue
        if not is_compact(solid_angles[label], extent, pixel_angle, int(pixel_counts[label])):
            continue
        lon, lat = direction_to_lonlat(means[label])
        colour = colour_sums[label] / max(colour_sums[label].max(), 1e-12)
        sources.append(LightSource(
            yaw_deg=float(np.degrees(lon)), pitch_deg=float(np.degrees(lat)),
            angular_radius_deg=math.degrees(cap_radius(solid_angles[label])),
            color=tuple(float(c) for c in colour), solid_angle=float(solid_angles[label]),
            pixels=int(pixel_counts[label]),
        ))
    return lights_among(sources)


def lights_among(regions: list[LightSource]) -> list[LightSource]:
    """The ``regions`` (every compact clipped region of an image) that can be lights: those with at least
    ``MIN_SOURCE_SHARE`` of their summed solid angle, at most ``MAX_SOURCES`` of them, largest first. An image
    busy with small highlights of similar size (lights of a city at night, a noisy texture) has none."""
    total = sum(region.solid_angle for region in regions)
    lights = sorted((region for region in regions if region.solid_angle >= MIN_SOURCE_SHARE * total),
                    key=lambda region: -region.solid_angle)
    return lights[:MAX_SOURCES]


def angular_distance_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees between unit directions ``a`` and ``b`` (3,)."""
    return math.degrees(math.acos(min(1.0, max(-1.0, float(np.dot(a, b))))))


def is_daylight(linear: np.ndarray) -> bool:
    """Whether the sky of the equirect ``linear`` (H, W, 3, before exposure) is lit by a sun: the
    solid-angle-weighted median luminance of its upper hemisphere is at least ``DAYLIGHT_SKY_LUMINANCE``."""
    return median_luminance(linear, upper_only=True) >= DAYLIGHT_SKY_LUMINANCE


def choose_sun(sources: list[LightSource], daylight: bool, sun_direction: tuple[float, float] | None = None,
               ) -> tuple[list[LightSource], str | None]:
    """Mark the sun among ``sources`` (largest first) and put it first; returns (sources, warning or None).

    Without ``sun_direction``: the largest source above the horizon (pitch > 0), when ``daylight``; else no
    sun. With ``sun_direction`` (yaw, pitch in degrees): the source whose disc comes nearest it, if within
    ``SUN_MATCH_DEG`` (centre distance minus angular radius); otherwise a sun is placed there
    (``SUN_ANGULAR_RADIUS_DEG``, ``PLACED_SUN_COLOR``, ``placed``) and a warning sentence is returned.
    """
    sun = None
    warning = None
    if sun_direction is not None:
        yaw, pitch = sun_direction
        wanted = lonlat_to_direction(math.radians(yaw), math.radians(pitch))
        gaps = [angular_distance_deg(source.direction, wanted) - source.angular_radius_deg for source in sources]
        if gaps and min(gaps) <= SUN_MATCH_DEG:
            sun = sources[int(np.argmin(gaps))]
        else:
            radius = math.radians(SUN_ANGULAR_RADIUS_DEG)
            sun = LightSource(yaw_deg=float(yaw), pitch_deg=float(pitch), angular_radius_deg=SUN_ANGULAR_RADIUS_DEG,
                              color=PLACED_SUN_COLOR, solid_angle=cap_solid_angle(radius), placed=True)
            sources = sources + [sun]
            warning = (f"no light source within {SUN_MATCH_DEG:g}° of --sun-direction {yaw:g},{pitch:g} in the image; "
                       f"placed a sun of {SUN_ANGULAR_RADIUS_DEG:g}° radius there")
    elif daylight:
        sun = next((source for source in sources if source.pitch_deg > 0.0), None)
    for source in sources:
        source.is_sun = source is sun
    return sorted(sources, key=lambda source: (not source.is_sun, -source.solid_angle)), warning


# ------------------------------------------------------------------ expanding them


def emitter_profile(theta: np.ndarray, radius: float) -> np.ndarray:
    """An emitter's weight at angle ``theta`` (radians) from its centre, for a disc of ``radius`` radians: 1 on
    the disc, falling smoothly (1 − smoothstep) to 0 over a halo ``HALO_WIDTH`` radii wide, 0 beyond."""
    t = np.clip((theta - radius) / (HALO_WIDTH * radius), 0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)


@dataclass
class _Window:
    """The pixels an emitter can touch: ``rows`` (h,) and wrapped ``cols`` (w,) indices into the equirect,
    their directions' cosines with the emitter's direction (h, w), their solid angles (h, 1)."""

    rows: np.ndarray
    cols: np.ndarray
    cosines: np.ndarray
    solid_angles: np.ndarray


def emitter_window(height: int, width: int, direction: np.ndarray, outer: float) -> _Window:
    """The rows and columns of an H x W equirect within ``outer`` radians of the unit ``direction``.

    Rows: those whose centres lie in [lat − outer, lat + outer], plus a row each side. Columns: all when the
    cap reaches a pole, else those within asin(sin outer / cos lat) of its longitude (the widest longitude
    span of a cap that does not reach a pole), plus a pixel each side, wrapping across the seam.
    """
    lon, lat = direction_to_lonlat(direction)
    step = np.pi / height
    top = max(0, int(math.floor((np.pi / 2 - (lat + outer)) / step)) - 1)
    bottom = min(height, int(math.ceil((np.pi / 2 - (lat - outer)) / step)) + 1)
    rows = np.arange(top, bottom)
    if abs(lat) + outer >= np.pi / 2 - step:
        cols = np.arange(width)
    else:
        span = math.asin(min(1.0, math.sin(outer) / math.cos(lat)))
        half = int(math.ceil(span / (2 * np.pi / width))) + 1
        centre = int(math.floor((lon + np.pi) / (2 * np.pi) * width))
        cols = np.arange(centre - half, centre + half + 1) % width if 2 * half + 1 < width else np.arange(width)
    directions = equirect_to_direction(cols[None, :], rows[:, None], width, height)
    return _Window(rows, cols, directions @ direction, pixel_solid_angles(height, width)[rows][:, None])


def add_emitter(image: np.ndarray, source: LightSource, target: float, max_radiance: float | None = None) -> None:
    """Draw ``source`` into ``image`` (H, W, 3) float32 linear, in place, so that it adds ``target``
    irradiance (EXR units, ``irradiance · colour`` in luminance) on a plane facing it.

    The emitter blends each pixel towards the disc value by the profile p (``emitter_profile``):
    new = old·(1 − p) + L·colour·p, so disc pixels are exactly L·colour and the sky around keeps its values.
    Its added irradiance is L·A − B with A = Σ p·cos θ·dω and B = Y(Σ p·old·cos θ·dω)/Y(colour), solved
    for L. L never falls below the disc's own luminance (the clipped value it replaces), so a tiny
    ``target`` leaves a disc at that level rather than darkening it. The drawn disc is at least one pixel
    high in radius (a 0.27° sun on a coarse image) and, with ``max_radiance`` (half floats), widened until
    L fits below it: the irradiance, what lights the scene, is kept either way. Sets ``source.radiance``,
    ``source.irradiance`` (the one achieved) and ``source.render_radius_deg``.
    """
    height, width = image.shape[:2]
    colour = np.asarray(source.color, np.float64)
    colour_y = float(colour @ LUMINANCE_WEIGHTS)
    radius = max(math.radians(source.angular_radius_deg), np.pi / height)
    for _ in range(32):
        window = emitter_window(height, width, source.direction, radius * (1.0 + HALO_WIDTH))
        theta = np.arccos(np.clip(window.cosines, -1.0, 1.0))
        profile = emitter_profile(theta, radius)
        weights = profile * np.maximum(window.cosines, 0.0) * window.solid_angles  # (h, w)
        old = image[window.rows[:, None], window.cols[None, :]].astype(np.float64)
        area = float(weights.sum())
        base = float(np.einsum("hw,hwc->c", weights, old) @ LUMINANCE_WEIGHTS) / colour_y
        disc = profile >= 1.0
        floor = float((old[disc] @ LUMINANCE_WEIGHTS).max()) / colour_y if disc.any() else 0.0
        radiance = max((target + base) / area if area > 0 else 0.0, floor)
        if max_radiance is None or radiance <= max_radiance:
            break
        radius *= math.sqrt(radiance / max_radiance) * 1.02  # L ~ target / (π r²): widen to fit, then solve again
    new = old * (1.0 - profile[..., None]) + radiance * colour * profile[..., None]
    image[window.rows[:, None], window.cols[None, :]] = new.astype(np.float32)
    source.radiance = float(radiance)
    source.irradiance = radiance * area - base
    source.render_radius_deg = math.degrees(radius)


def expand_sources(sky: np.ndarray, sources: list[LightSource], sun_ratio: float = DEFAULT_SUN_RATIO,
                   sun_strength: float | None = None, max_radiance: float | None = None) -> tuple[np.ndarray, float]:
    """The HDR image: ``sky`` (H, W, 3) float32 linear with every source of ``sources`` drawn as an emitter
    (``add_emitter``). Returns (hdr, the diffuse irradiance the reference source was solved against).

    The *reference* is the sun (``sources[0]`` when ``is_sun``), else the largest source. Its irradiance on
    a plane facing it is ``sun_ratio`` · D, D the luminance irradiance the *sky* gives that plane: the world
    that is left when the sources are lamps (``panorama_sky.exr``, which Blender's Sun-lamp mode shows to
    every ray but the camera's), so a lamp of that irradiance is ``sun_ratio`` times the World's light on
    it. The other emitters are not counted in D: each is a light of its own, not sky. Or the irradiance is
    ``sun_strength`` when given. Every other
    source k gets the same rule scaled by its size relative to the reference, capped at 1:
    ``sun_ratio · D_sky(k) · min(1, Ω_k / Ω_ref)`` (D_sky(k): the sky alone on a plane facing k, so that
    sun glints below the horizon cannot feed back into the sun), or ``sun_strength · min(1, Ω_k / Ω_ref)``.
    For small discs irradiance ≈ L·Ω, so the others get about the reference's radiance: pixels clipped
    alike are taken to be alike. The others are drawn first, the reference last.
    """
    hdr = sky.astype(np.float32, copy=True)
    if not sources:
        return hdr, 0.0
    reference, others = sources[0], sources[1:]
    coarse_sky = downsampled(sky) if others else None
    for source in others:
        share = min(1.0, source.solid_angle / reference.solid_angle)
        if sun_strength is not None:
            target = sun_strength * share
        else:
            target = sun_ratio * float(plane_irradiance(coarse_sky, source.direction) @ LUMINANCE_WEIGHTS) * share
        add_emitter(hdr, source, target, max_radiance)
    diffuse = float(plane_irradiance(sky, reference.direction) @ LUMINANCE_WEIGHTS)
    add_emitter(hdr, reference, sun_strength if sun_strength is not None else sun_ratio * diffuse, max_radiance)
    return hdr, diffuse


# ------------------------------------------------------------------ the whole step


def make_hdr(linear: np.ndarray, exposure: float = 0.0, sun_ratio: float = DEFAULT_SUN_RATIO,
             sun_strength: float | None = None, sun_direction: tuple[float, float] | None = None, half: bool = False,
             warn: Callable[[str], None] | None = None) -> HdrResult:
    """The HDR lighting of an equirect panorama (module docstring, steps 1–3).

    ``linear``: (H, 2H, 3) scene-linear RGB before exposure (``images.srgb_to_linear`` of the 8-bit image).
    ``exposure``: EV, the sky is ``linear · 2^exposure``. ``sun_ratio`` R > 0 / ``sun_strength`` S > 0 (EXR
    units, overrides R): ``expand_sources``. ``sun_direction``: (yaw, pitch) degrees, ``choose_sun``.
    ``half``: the images will be stored as half floats, so no pixel may exceed ``HALF_MAX``. ``warn``: called
    with each warning sentence (default: printed to stderr as "warning: …").
    Returns an ``HdrResult``. The values were checked by ``request.check_hdr_options``.
    """
    started = time.perf_counter()
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    linear = np.asarray(linear, np.float32)
    sky = linear * np.float32(2.0 ** exposure)
    sources, warning = choose_sun(find_light_sources(linear), is_daylight(linear), sun_direction)
    warnings = []
    if warning:
        warn(warning)
        warnings.append(warning)
    if half and float(sky.max()) > HALF_MAX:
        raise BadRequest(f"--exposure {exposure:g} takes the sky above the largest half-float value; lower it or leave out --half.")
    hdr, diffuse = expand_sources(sky, sources, sun_ratio, sun_strength, HALF_MAX / 1.01 if half else None)
    sun = sources[0] if sources and sources[0].is_sun else None
    if sun is None:  # the contract: without a sun, the sky's irradiance on a plane facing straight up
        diffuse = float(plane_irradiance(hdr, np.array([0.0, 1.0, 0.0])) @ LUMINANCE_WEIGHTS)
    lighting = lighting_json(sources, exposure, None if sun_strength is not None else sun_ratio, diffuse)
    details = {
        "sources": len(sources),
        "sun": None if sun is None else {"yaw_deg": sun.yaw_deg, "pitch_deg": sun.pitch_deg,
                                         "angular_radius_deg": sun.angular_radius_deg, "placed": sun.placed},
        "dynamic_range_before": dynamic_range(sky),
        "dynamic_range_after": dynamic_range(hdr),
        "seconds": time.perf_counter() - started,
    }
    return HdrResult(hdr, sky, lighting, sources, details, warnings)


def lighting_json(sources: list[LightSource], exposure: float, sun_ratio: float | None, diffuse: float) -> dict:
    """The lighting.json dict (version 1) of expanded ``sources`` (the sun first).

    ``diffuse``: the luminance irradiance of the sky (``panorama_sky.exr``: no emitter drawn) on a plane
    facing the sun, or, without a sun, of the whole HDR image on a plane facing straight up. Each source's
    ``irradiance_ratio`` is its ``irradiance`` / ``diffuse`` (the sun's is ``sun_ratio``, unless its disc could
    not be made that faint). ``sun_ratio``: None when ``--sun-strength`` set the sun's irradiance.
    """
    return {
        "version": 1,
        "exposure_ev": float(exposure),
        "sun_ratio": None if sun_ratio is None else float(sun_ratio),
        "diffuse_irradiance": float(diffuse),
        "sources": [{
            "yaw_deg": float(source.yaw_deg),
            "pitch_deg": float(source.pitch_deg),
            "angular_radius_deg": float(source.angular_radius_deg),
            "color": [float(c) for c in source.color],
            "radiance": float(source.radiance),
            "irradiance": float(source.irradiance),
            "irradiance_ratio": float(source.irradiance / diffuse) if diffuse > 0 else None,
            "is_sun": bool(source.is_sun),
            "placed": bool(source.placed),
        } for source in sources],
    }


def hdr_writers(result: HdrResult, half: bool = False) -> list[tuple[str, Callable[[str], None]]]:
    """(file name, write(path)) pairs for ``files.write_files_atomically``: panorama.exr (the HDR image),
    panorama_sky.exr (the sky) and lighting.json, in ``HDR_OUTPUT_NAMES``' order. ``half``: half-float
    EXRs instead of float32."""
    return [
        (HDR_OUTPUT_NAMES[0], lambda path: images.write_exr(path, result.hdr, half=half)),
        (HDR_OUTPUT_NAMES[1], lambda path: images.write_exr(path, result.sky, half=half)),
        (HDR_OUTPUT_NAMES[2], lambda path: images.write_json(path, result.lighting)),
    ]


def write_hdr(panorama: str, out: str, exposure: float = 0.0, sun_ratio: float = DEFAULT_SUN_RATIO,
              sun_strength: float | None = None, sun_direction=None, half: bool = False,
              overwrite: bool = False) -> dict[str, str]:
    """``python -m backend hdr``: write panorama.exr, panorama_sky.exr and lighting.json of the equirect
    ``panorama`` (.png: 8-bit sRGB, linearised; .exr: already linear) into the folder ``out``, atomically.

    Options as ``make_hdr``; ``sun_direction`` as the CLI gives it ("YAW,PITCH") or a (yaw, pitch) pair.
    Existing files of those names are replaced only with ``overwrite``. Returns {file name: path}. Raises
    BadRequest (one sentence, nothing written) for bad values or input, SyncSphereError when writing fails.
    """
    sun_direction = check_hdr_options(exposure, sun_ratio, sun_strength, sun_direction)
    panorama = os.path.abspath(os.path.expanduser(panorama))
    out = check_output_folder(out, HDR_OUTPUT_NAMES, overwrite)
    image = images.read_equirect(panorama)
    if image.shape[0] < 2:
        raise BadRequest(f"The panorama {panorama} is too small to light anything.")
    linear = image if panorama.lower().endswith(".exr") else images.srgb_to_linear(image)
    result = make_hdr(linear, exposure, sun_ratio, sun_strength, sun_direction, half)
    try:
        return write_files_atomically(out, hdr_writers(result, half))
    except OSError as error:
        raise SyncSphereError(f"Could not write the HDR files into {out} ({error.strerror or error}).") from None
