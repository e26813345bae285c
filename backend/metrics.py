"""Coherence metrics of a finished image: SyncDiffusion's Intra-LPIPS and Intra-Style-L, and seam ratios.

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

import itertools
import math

import numpy as np
import torch

from .errors import BadRequest

METRIC_LAYOUTS = ("wide", "equirect", "tile")
METRIC_LOSSES = ("lpips-vgg", "style")
HORIZON_FACES = ("F", "R", "B", "L")
# LPIPS-VGG pools four times, so a crop needs at least 16 px on a side to reach its last layer.
MIN_WINDOW_PX = 16
# At most this many pixels per crop times pairs in one loss call (two 512 px pairs): bounds memory
# whatever the window, while small crops still go through in one or a few batches.
_PAIR_PIXEL_BUDGET = 2 * 512 * 512


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


def horizon_faces(image: np.ndarray, face_size: int) -> np.ndarray:
    """The four horizon cube faces F, R, B, L of an equirect ``image`` (H, W, 3) with H = W/2, uint8 or
    [0, 1] float sRGB: 90° perspective views looking forward, right, back and left, which tile the
    horizon without overlap (``backend.geometry.equirect_to_cube_faces``, design section 3 orientation).
    Returns (4, face_size, face_size, 3) float32 in [0, 1], in the order F, R, B, L."""
    from .geometry import equirect_to_cube_faces

    faces = equirect_to_cube_faces(_to_unit_float(image), face_size)
    return np.stack([np.clip(faces[face], 0.0, 1.0) for face in HORIZON_FACES])


def load_losses(backbone: str = "auto", device: torch.device | str = "cpu") -> dict:
    """The two metric losses, {"lpips-vgg": ..., "style": ...} (``backend.perceptual.load_perceptual_loss``
    with ``backbone`` auto, pretrained or random), unscaled, on ``device``. Load them once to measure
    several images."""
    from .perceptual import load_perceptual_loss

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
    if layout not in METRIC_LAYOUTS:
        raise BadRequest(f"Unknown layout {layout!r}; use one of {', '.join(METRIC_LAYOUTS)}.")
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
    the same metrics on the perspective faces F, R, B, L of size window_px. Finally backbones
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

    from .cubemap import read_panorama
    from .outputs import linear_to_srgb

    image = read_panorama(os.path.abspath(os.path.expanduser(path)))
    if os.path.splitext(path)[1].lower() == ".exr":
        image = linear_to_srgb(image)
    return image
