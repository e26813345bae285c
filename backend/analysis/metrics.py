"""Coherence metrics of a finished image: SyncDiffusion's Intra-LPIPS and Intra-Style-L, and seam ratios
(wrap seams; on an equirect image also the 12 cube-face edges and the two poles).

``python -m backend metrics IMAGE --layout ...`` prints ``measure``'s result; docs/metrics.md says what the
numbers mean and where we differ from the paper's evaluation code (Lee et al., NeurIPS 2023).

Conventions, for every function here:

- An image is an (H, W, 3) numpy array of sRGB-encoded values: uint8 in [0, 255] or float in [0, 1]
  (floats outside [0, 1] are clipped before a loss sees them). Crops are (N, h, w, 3) arrays of the same
  kind. Pixel (row, col) = (0, 0) is the top-left corner.
- Losses are ``backend.perceptual.PerceptualLoss`` objects ("lpips-vgg" and "style"); they take (N, 3, h, w)
  tensors in [-1, 1], which the functions here build from the crops.
- An "intra" metric is the mean of a loss over all unordered pairs of crops of one image: lower is more
  coherent (the crops look more alike).

Plain numpy and torch; no bpy.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from ..errors import BadRequest
from ..request import LAYOUTS


METRIC_LOSSES = ("lpips-vgg", "style")
HORIZON_FACES = ("F", "R", "B", "L")
# LPIPS-VGG pools four times, so a crop needs at least 16 px on a side to reach its last layer.
MIN_WINDOW_PX = 16
# At most this many pixels per crop times pairs in one loss call (two 512 px pairs): bounds memory
# whatever the window, while small crops still go through in one or a few batches.
_PAIR_PIXEL_BUDGET = 2 * 512 * 512
# The pole ratios: straight lines sampled through the centre of the U and D faces; steps within
# POLE_NEAR_DEGREES of the pole (polar angle) are "at the pole", compared with those out to POLE_RING_DEGREES.
POLE_DIAMETERS = 32
POLE_NEAR_DEGREES = 5.0
POLE_RING_DEGREES = 10.0


def crop_positions(height: int, width: int, window: int) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of the non-overlapping window x window crops of an image of
    ``height`` x ``width`` px: every corner whose row and column are multiples of ``window`` and whose
    crop fits entirely inside the image, row by row from the top-left (the order of SyncDiffusion's
    evaluation code with stride = window). Pixels of a last partial row or column of crops are unused.
    Returns an empty list when not even one crop fits."""
    if window < 1:
        raise ValueError(f"A crop window must be at least 1 px, not {window}.")
    return [(row, col) for row in range(0, height - window + 1, window) for col in range(0, width - window + 1, window)]


def non_overlapping_crops(image: np.ndarray, window: int) -> np.ndarray:
    """The non-overlapping window x window crops of ``image`` (H, W, 3), at the positions of
    ``crop_positions`` and in that order: an (N, window, window, 3) array of the image's dtype and range
    (a copy). N may be 0 or 1; the intra metrics need at least 2."""
    positions = crop_positions(image.shape[0], image.shape[1], window)
    if not positions:
        return np.empty((0, window, window) + image.shape[2:], dtype=image.dtype)
    return np.stack([image[row:row + window, col:col + window] for row, col in positions])


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] (clipped) -> float32 [0, 1], same shape."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _loss_device(loss: torch.nn.Module) -> torch.device:
    """The device of the loss's parameters (cpu for a loss without any)."""
    parameter = next(loss.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def pairs_per_batch(window_height: int, window_width: int) -> int:
    """How many crop pairs ``mean_pairwise_loss`` sends through a loss at once for crops of this size
    (at least 1): a fixed pixel budget, two 512 x 512 pairs, so memory stays bounded."""
    return max(1, _PAIR_PIXEL_BUDGET // max(1, window_height * window_width))


def mean_pairwise_loss(crops: np.ndarray, loss: torch.nn.Module, batch_pairs: int | None = None) -> float:
    """Mean of ``loss`` over all N(N-1)/2 unordered pairs (i < j) of ``crops``.

    crops: (N, h, w, 3), N >= 2, uint8 [0, 255] or float [0, 1] sRGB. loss: a PerceptualLoss (or any
    module taking two (B, 3, h, w) tensors in [-1, 1] and returning (B,)). Pairs are evaluated
    ``batch_pairs`` at a time (default ``pairs_per_batch``), in the order of ``itertools.combinations``,
    without gradients, on the loss's device. Returns a Python float (float64 accumulation).
    """
    count = len(crops)
    if count < 2:
        raise ValueError(f"A pairwise metric needs at least 2 crops, got {count}.")
    images = torch.from_numpy(_to_unit_float(np.asarray(crops))).permute(0, 3, 1, 2) * 2.0 - 1.0
    images = images.to(_loss_device(loss))
    pairs = torch.tensor(list(itertools.combinations(range(count), 2)), device=images.device)
    batch = batch_pairs or pairs_per_batch(images.shape[2], images.shape[3])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            values = loss(images[chunk[:, 0]], images[chunk[:, 1]])
            total += float(values.double().sum())
    return total / len(pairs)


def intra_lpips(crops: np.ndarray, loss: torch.nn.Module, batch_pairs: int | None = None) -> float:
    """Intra-LPIPS: the mean LPIPS distance over all unordered pairs of ``crops`` (N, h, w, 3), N >= 2,
    uint8 or [0, 1] float sRGB. ``loss``: an LPIPS PerceptualLoss ("lpips-vgg" is the paper's). 0 when all
    crops are identical; the paper measured about 0.74 between unrelated Stable Diffusion images (pretrained trunk).
    See ``mean_pairwise_loss`` for batching."""
    name = getattr(loss, "name", "lpips")
    if not name.startswith("lpips"):
        raise ValueError(f"intra_lpips needs an LPIPS loss, not {name!r}.")
    return mean_pairwise_loss(crops, loss, batch_pairs)


def intra_style_loss(crops: np.ndarray, loss: torch.nn.Module, batch_pairs: int | None = None) -> float:
    """Intra-Style-L: the mean Gram-matrix style loss (Gatys et al.; VGG19's first five convolutions) over
    all unordered pairs of ``crops`` (N, h, w, 3), N >= 2, uint8 or [0, 1] float sRGB. ``loss``: the
    "style" PerceptualLoss, unscaled. 0 when all crops are identical; the paper reports it x 10^-3.

    The paper defines the metric as this average; its evaluation script (eval_style_loss.py) adds the
    pair losses up instead of dividing by the number of pairs. We follow the paper's definition, so a
    value from that script is ours times the number of pairs (15 for six crops)."""
    name = getattr(loss, "name", "style")
    if name != "style":
        raise ValueError(f"intra_style_loss needs the style loss, not {name!r}.")
    return mean_pairwise_loss(crops, loss, batch_pairs)


def seam_ratio(image: np.ndarray, axis: int) -> float:
    """How visible the wrap seam of ``image`` (H, W, C), any numeric dtype and range, is along ``axis``.

    axis 1: columns, the left/right seam (last column next to the first); axis 0: rows, the top/bottom
    seam. The mean absolute difference between the last and the first line, divided by the median over
    neighbouring line pairs of their mean absolute difference. About 1 or less when the wrap is seamless
    (the edge lines differ as neighbours do); well above 1 for a hard seam. Scale-free, so uint8 and
    [0, 1] versions of an image give the same ratio. A constant image (median 0) gives 0 without a seam
    and ``inf`` with one.
    """
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (rows) or 1 (columns), not {axis}.")
    lines = image.astype(np.float32) if axis == 1 else image.astype(np.float32).transpose(1, 0, 2)
    neighbours = np.abs(np.diff(lines, axis=1)).mean(axis=(0, 2))
    seam = float(np.abs(lines[:, -1] - lines[:, 0]).mean())
    typical = float(np.median(neighbours))
    if typical == 0.0:
        return 0.0 if seam == 0.0 else math.inf
    return seam / typical


def _ratio(across: float, typical: float) -> float:
    """``across / typical`` as ``seam_ratio`` reports it: 0 for 0 / 0, ``inf`` for x / 0."""
    if typical == 0.0:
        return 0.0 if across == 0.0 else math.inf
    return across / typical


@functools.lru_cache(maxsize=8)
def cube_edges(face_size: int) -> tuple:
    """The 12 edges of a cube map with faces of ``face_size`` px, derived from ``backend.geometry``.

    For each side of each face, the direction one texel beyond its outer texels (the face's plane
    extended) is looked up on the cube (``direction_to_cube_face``): that names the neighbouring face and
    its texels across the edge, the nearest to those points (about half a texel from the edge, as the
    face's own outer texels are). Each edge is kept once, from the face that comes first in F R B L U D.
    Returns a tuple of (name "A-B", face A, (rows, cols) of A's outer texels, axis, face B, (rows, cols)
    of B's matching texels, axis): ``axis`` is the face axis across the edge (1: the edge is a column,
    as between F and R; 0: a row, as between F and U).
    """
    from ..sphere.geometry import FACE_VIEWS, FACES, direction_to_cube_face, perspective_to_direction

    s = face_size
    along = np.arange(s)
    sides = (  # (outer texel rows, cols), one step outwards (drow, dcol), the axis across the side
        ((along, np.zeros(s, np.intp)), (0, -1), 1), ((along, np.full(s, s - 1)), (0, 1), 1),
        ((np.zeros(s, np.intp), along), (-1, 0), 0), ((np.full(s, s - 1), along), (1, 0), 0),
    )
    edges = []
    for face in FACES:
        for (rows, cols), (drow, dcol), axis in sides:
            beyond = perspective_to_direction(cols + dcol, rows + drow, *FACE_VIEWS[face], 0.0, 90.0, s)
            neighbour, col, row = direction_to_cube_face(beyond, s)
            other = FACES[int(neighbour[0])]
            if not (neighbour == neighbour[0]).all() or other == face:
                raise AssertionError(f"face {face}: the texels beyond one side lie on more than one face")
            if FACES.index(other) < FACES.index(face):
                continue  # this edge was kept from the other face
            other_rows = np.clip(np.rint(row), 0, s - 1).astype(np.intp)
            other_cols = np.clip(np.rint(col), 0, s - 1).astype(np.intp)
            other_axis = 1 if s == 1 or (other_cols == other_cols[0]).all() and other_cols[0] in (0, s - 1) else 0
            edges.append((f"{face}-{other}", face, (rows, cols), axis, other, (other_rows, other_cols), other_axis))
    return tuple(edges)


def _line_differences(face: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference of each pair of neighbouring lines of ``face`` (s, s, C): columns for
    ``axis`` 1, rows for 0 (the lines parallel to a cube edge of that axis): s − 1 values."""
    return np.abs(np.diff(face, axis=axis)).mean(axis=(1 - axis, 2))


def cube_edge_ratios(image: np.ndarray) -> dict[str, float]:
    """How visible each of the 12 cube-face edges of an equirect ``image`` (H, 2H, C) is, as ``seam_ratio``
    measures a wrap seam.

    The faces are cut with our geometry (``geometry.equirect_to_cube_faces``, W/4 px, texel centres) from
    the image as it is (any numeric dtype and range). For each edge (``cube_edges``): the mean absolute
    difference between the two faces' outer texels that meet there, divided by the median, over the
    neighbouring pairs of lines parallel to the edge inside both faces (in each face, its columns where the
    edge is one of its columns, its rows where it is a row), of their mean absolute difference. About 1
    or less without a seam, well above 1 with one; 0 / 0 is 0 and x / 0 is ``inf``. Returns
    {"F-R": ratio, …} for the 12 edges in ``cube_edges`` order.
    """
    from ..sphere.geometry import equirect_to_cube_faces

    pixels = np.asarray(image, dtype=np.float32)
    face_size = max(1, pixels.shape[1] // 4)
    faces = equirect_to_cube_faces(pixels, face_size)
    ratios = {}
    for name, face_a, texels_a, axis_a, face_b, texels_b, axis_b in cube_edges(face_size):
        across = float(np.abs(faces[face_a][texels_a] - faces[face_b][texels_b]).mean())
        lines = np.concatenate([_line_differences(faces[face_a], axis_a), _line_differences(faces[face_b], axis_b)])
        ratios[name] = _ratio(across, float(np.median(lines)) if len(lines) else 0.0)
    return ratios


def pole_profile(image: np.ndarray, diameters: int = POLE_DIAMETERS) -> dict[str, np.ndarray]:
    """Step differences along great circles through the poles, sampled on the U and D cube faces.

    The faces are cut with our geometry (``geometry.equirect_to_cube_faces``, W/4 px) from the equirect
    ``image`` (H, 2H, C), any numeric dtype and range. On each of U and D, ``diameters`` straight lines
    through the face centre (azimuths 180° k / ``diameters``) are sampled (``geometry.sample_cube_faces``)
    at equal angles on the sphere, one equirect row (180° / H) apart, at ±0.5, ±1.5, … rows from the pole
    out to 45° (the circle inscribed in the face); equal angles, not equal texels, so that a smooth image
    changes by as much per step near the face centre as near its edge. Returns {"U": ..., "D": ...}, each
    a pair (angles, steps): the polar angle in degrees of the steps' midpoints (0: the step across the
    pole, then one row further out each) and the mean absolute difference of the steps at that distance
    from the pole, over both sides of every diameter and the channels (so the profile does not change when
    the image turns about the poles by a multiple of 180° / ``diameters``).
    """
    from ..sphere.geometry import FACE_VIEWS, equirect_to_cube_faces, perspective_to_direction, sample_cube_faces

    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    face_size = max(1, width // 4)
    faces = equirect_to_cube_faces(pixels, face_size)
    step = math.pi / height
    count = max(1, int(math.floor(math.atan(1.0 - 1.0 / face_size) / step - 0.5)) + 1)
    polar = (np.arange(-count, count) + 0.5) * step  # signed angles from the pole
    azimuth = np.arange(diameters) * math.pi / diameters
    radius = np.tan(polar)[None, :] * face_size / 2.0  # in texels from the face centre
    centre = (face_size - 1) / 2.0
    cols = centre + radius * np.cos(azimuth)[:, None]
    rows = centre + radius * np.sin(azimuth)[:, None]
    profile = {}
    for face in ("U", "D"):
        directions = perspective_to_direction(cols, rows, *FACE_VIEWS[face], 0.0, 90.0, face_size)
        samples = sample_cube_faces(faces, directions)  # (diameters, 2 count, C)
        steps = np.abs(np.diff(samples, axis=1)).mean(axis=(0, 2))  # step j between samples j and j + 1
        # Step count - 1 crosses the pole; fold the steps on its two sides together, by distance.
        folded = np.concatenate([steps[count - 1:count], (steps[count:] + steps[count - 2::-1]) / 2.0])
        profile[face] = (np.degrees(np.arange(len(folded)) * step), folded)
    return profile


def pole_ratios(image: np.ndarray, near_degrees: float = POLE_NEAR_DEGREES, ring_degrees: float = POLE_RING_DEGREES) -> dict[str, float]:
    """How visible a discontinuity at the zenith (U) and nadir (D) of an equirect ``image`` (H, 2H, C) is.

    From ``pole_profile`` (one step = one equirect row along a great circle through the pole): the larger
    of the step across the pole itself and the mean step within ``near_degrees`` of the pole, divided by
    the median step in the ring from ``near_degrees`` to ``ring_degrees`` around it (at least the first
    step beyond ``near_degrees``). A pinch, content converging into a star at the pole, shows at the step
    across the pole, where each diameter compares opposite sides of the star; a cap with a hard edge
    within ``near_degrees`` raises the mean step there. A smooth image changes about as fast at the pole as
    just around it: about 1. 0 / 0 is 0 and x / 0 is ``inf``. Returns {"U": ratio, "D": ratio}.
    """
    ratios = {}
    for face, (distance, steps) in pole_profile(image).items():
        near = distance <= near_degrees
        crossing = float(steps[0])
        beyond = distance[~near]
        ring = ~near & (distance <= max(ring_degrees, beyond.min() if len(beyond) else 0.0))
        typical = float(np.median(steps[ring])) if ring.any() else 0.0
        ratios[face] = _ratio(max(crossing, float(steps[near].mean())), typical)
    return ratios


def horizon_faces(image: np.ndarray, face_size: int) -> np.ndarray:
    """The four horizon cube faces F, R, B, L of an equirect ``image`` (H, W, 3) with H = W/2, uint8 or
    [0, 1] float sRGB: 90° perspective views looking forward, right, back and left, which tile the
    horizon without overlap (``backend.sphere.geometry.equirect_to_cube_faces``, docs/conventions.md#directions).
    Returns (4, face_size, face_size, 3) float32 in [0, 1], in the order F, R, B, L."""
    from ..sphere.geometry import equirect_to_cube_faces

    faces = equirect_to_cube_faces(_to_unit_float(image), face_size)
    return np.stack([np.clip(faces[face], 0.0, 1.0) for face in HORIZON_FACES])


def load_losses(backbone: str = "auto", device: torch.device | str = "cpu") -> dict:
    """The two metric losses, {"lpips-vgg": ..., "style": ...} (``backend.perceptual.load_perceptual_loss``
    with ``backbone`` auto, pretrained or random), unscaled, on ``device``. Load them once to measure
    several images."""
    from ..engine.perceptual import load_perceptual_loss

    return {name: load_perceptual_loss(name, device=device, backbone=backbone) for name in METRIC_LOSSES}


def default_window(layout: str, height: int) -> int:
    """The default crop size in px for ``layout`` and an image ``height`` px high: the height for
    ``wide`` (square crops across the strip, as the paper's 512 px crops of a 512 px high panorama) and
    half the height for ``equirect`` and ``tile`` (on an equirect image that is also W/4, the horizon
    face size that keeps the image's resolution)."""
    return height if layout == "wide" else max(1, height // 2)


def check_measurable(shape: tuple, layout: str, window_px: int | None = None) -> int:
    """Validate an image of ``shape`` (H, W, 3) for ``measure`` and return the window in px to use.

    Raises BadRequest with one sentence for an unknown layout, an image that is not RGB, an equirect
    image that is not 2:1, a window below MIN_WINDOW_PX, or a window that leaves fewer than 2 crops."""
    if layout not in LAYOUTS:
        raise BadRequest(f"Unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    if len(shape) != 3 or shape[2] != 3:
        raise BadRequest(f"Expected an RGB image of shape (H, W, 3), got {tuple(shape)}.")
    height, width = shape[:2]
    if layout == "equirect" and width != 2 * height:
        raise BadRequest(f"The image is {width}x{height} px; a 360° equirectangular image is twice as wide as it is high.")
    window = default_window(layout, height) if window_px is None else int(window_px)
    if window < MIN_WINDOW_PX:
        raise BadRequest(f"The crop window is {window} px; the metrics need at least {MIN_WINDOW_PX} px.")
    count = len(crop_positions(height, width, window))
    if count < 2:
        raise BadRequest(f"A {window} px window fits {count} non-overlapping crop{'s' if count != 1 else ''} into the "
                         f"{width}x{height} px image; the metrics compare pairs of crops, so use a smaller --window-px.")
    return window


def measure(image: np.ndarray, layout: str, window_px: int | None = None, backbone: str = "auto",
            losses: dict | None = None, device: torch.device | str = "cpu") -> dict:
    """All coherence metrics of one image; the dict ``python -m backend metrics`` prints.

    image: (H, W, 3), uint8 [0, 255] or float [0, 1] sRGB. layout: wide, equirect (H = W/2) or tile.
    window_px: crop size (default ``default_window``). backbone: the loss trunks' weights (auto,
    pretrained, random), used when ``losses`` (from ``load_losses``) is not given; device: where
    to load them. Input is checked (``check_measurable``, BadRequest) before any network loads.

    Keys: layout, width, height, window_px, crops, pairs, intra_lpips, intra_style_l (unscaled; the paper
    prints it x 10^-3), seam_ratio_x (equirect and tile: the left/right wrap seam) and seam_ratio_y (tile:
    top/bottom); a wide image is planar and has no wrap seam, so it gets neither. Equirect also gets
    horizon_faces (4), horizon_faces_pairs (6), horizon_faces_intra_lpips and horizon_faces_intra_style_l:
    the same metrics on the perspective faces F, R, B, L of size window_px, and the sphere's seam ratios:
    cube_edge_ratios ({"F-L": ratio, …} for the 12 cube edges, ``cube_edge_ratios``), cube_edge_ratio_max,
    pole_ratio_up and pole_ratio_down (``pole_ratios``; seam_ratio_x is the ±180° meridian). Finally backbones
    ({loss: "vgg16 pretrained" / "... random (why)"}) and pretrained (True only if every trunk was).
    A seam ratio that is infinite (constant image with a seam) is reported as None (JSON null).
    """
    image = np.asarray(image)
    window = check_measurable(image.shape, layout, window_px)
    if losses is None:
        losses = load_losses(backbone, device)
    pixels = _to_unit_float(image)
    crops = non_overlapping_crops(pixels, window)
    count = len(crops)
    result = {
        "layout": layout,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "window_px": window,
        "crops": count,
        "pairs": count * (count - 1) // 2,
        "intra_lpips": intra_lpips(crops, losses["lpips-vgg"]),
        "intra_style_l": intra_style_loss(crops, losses["style"]),
    }
    if layout in ("equirect", "tile"):
        result["seam_ratio_x"] = _finite_or_none(seam_ratio(pixels, 1))
    if layout == "tile":
        result["seam_ratio_y"] = _finite_or_none(seam_ratio(pixels, 0))
    if layout == "equirect":
        faces = horizon_faces(pixels, window)
        result["horizon_faces"] = len(faces)
        result["horizon_faces_pairs"] = len(faces) * (len(faces) - 1) // 2
        result["horizon_faces_intra_lpips"] = intra_lpips(faces, losses["lpips-vgg"])
        result["horizon_faces_intra_style_l"] = intra_style_loss(faces, losses["style"])
        edges = cube_edge_ratios(pixels)
        result["cube_edge_ratios"] = {edge: _finite_or_none(value) for edge, value in edges.items()}
        result["cube_edge_ratio_max"] = _finite_or_none(max(edges.values()))
        poles = pole_ratios(pixels)
        result["pole_ratio_up"], result["pole_ratio_down"] = _finite_or_none(poles["U"]), _finite_or_none(poles["D"])
    result["backbones"] = {name: losses[name].backbone.describe() for name in METRIC_LOSSES}
    result["pretrained"] = all(losses[name].backbone.pretrained for name in METRIC_LOSSES)
    return result


def _finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON null) when it is infinite or NaN."""
    return value if math.isfinite(value) else None


def read_image(path: str) -> np.ndarray:
    """Read an image file for ``measure``: (H, W, 3) float32 sRGB in [0, 1]. A .png (8-bit) is read as it
    is; an .exr (scene-linear, as ``generate`` writes) is clipped to [0, 1] and sRGB-encoded, since the
    metrics compare images as they are seen. Raises BadRequest with one sentence when the file is
    missing, of another type or unreadable (``backend.cubemap.read_panorama``)."""
    import os

    from ..products.images import read_panorama
    from ..products.images import linear_to_srgb

    image = read_panorama(os.path.abspath(os.path.expanduser(path)))
    if os.path.splitext(path)[1].lower() == ".exr":
        image = linear_to_srgb(image)
    return image
