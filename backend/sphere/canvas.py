"""Canvases and the crop views that tile them, with wrap-around indexing.

A canvas is a latent image of shape (1, C, H, W) (latent pixels, not image pixels) of one of three kinds:

- ``wide``: planar; views stay inside it.
- ``equirect``: wraps in longitude (x): a view may cross the right edge and continue at column 0.
- ``tile``: wraps in both x and y, so the decoded image tiles seamlessly.

A crop view is a square window of the canvas read exactly (no resampling). Views are listed row by
row, top to bottom and left to right, as diffusers' panorama pipeline lists them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

CANVAS_KINDS = ("wide", "equirect", "tile")


@dataclass(frozen=True)
class CropView:
    """A window of the canvas: top-left corner (top, left) and size, all in latent pixels.

    ``top + height`` may exceed the canvas height (and ``left + width`` its width) on a wrapping axis:
    the window continues at row (column) 0.
    """

    top: int
    left: int
    height: int
    width: int


def window_starts(size: int, window: int, stride: int, wraps: bool) -> list[int]:
    """Start positions of windows along one axis so that every position is covered.

    On a wrapping axis windows start every ``stride`` positions all the way round, so no position is
    special (shifting the canvas by a multiple of the stride maps the set of windows onto itself).
    On a planar axis windows start every ``stride`` positions and one more window is aligned with the
    far edge when ``size - window`` is not a multiple of ``stride`` (diffusers' panorama pipeline leaves
    those last columns blank; with the extra window they are covered).
    """
    if window > size:
        raise ValueError(f"window {window} is larger than the canvas side {size}")
    if wraps:
        return list(range(0, size, stride))
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class Canvas:
    """A latent canvas of ``kind`` with ``height`` x ``width`` latent pixels (see the module docstring)."""

    def __init__(self, kind: str, height: int, width: int):
        if kind not in CANVAS_KINDS:
            raise ValueError(f"unknown canvas kind {kind!r}")
        self.kind = kind
        self.height = height
        self.width = width
        self.wraps_x = kind in ("equirect", "tile")
        self.wraps_y = kind == "tile"

    def crop_views(self, window: int, stride: int) -> list[CropView]:
        """Square windows of side ``window`` every ``stride`` latent pixels, covering the whole canvas."""
        tops = window_starts(self.height, window, stride, self.wraps_y)
        lefts = window_starts(self.width, window, stride, self.wraps_x)
        return [CropView(top, left, window, window) for top in tops for left in lefts]

    def read(self, canvas_tensor: torch.Tensor, views: list[CropView]) -> torch.Tensor:
        """The views' windows of ``canvas_tensor`` (B, C, H, W), stacked to (len(views) * B, C, h, w)."""
        crops, device = [], canvas_tensor.device
        for view in views:
            rows = _axis_index(view.top, view.height, self.height, device)
            cols = _axis_index(view.left, view.width, self.width, device)
            crop = canvas_tensor[:, :, rows] if isinstance(rows, slice) else canvas_tensor.index_select(2, rows)
            crop = crop[:, :, :, cols] if isinstance(cols, slice) else crop.index_select(3, cols)
            crops.append(crop)
        return torch.cat(crops)

    def add(self, canvas_tensor: torch.Tensor, view: CropView, values: torch.Tensor | float) -> None:
        """Add ``values`` (B, C, h, w, or a number) into ``view``'s window of ``canvas_tensor``, in place."""
        device = canvas_tensor.device
        rows = _axis_index(view.top, view.height, self.height, device)
        cols = _axis_index(view.left, view.width, self.width, device)
        if isinstance(rows, slice) and isinstance(cols, slice):
            canvas_tensor[:, :, rows, cols] += values
            return
        rows = _wrapped_index(view.top, view.height, self.height, device)
        cols = _wrapped_index(view.left, view.width, self.width, device)
        # Indices within one view are unique (a window is never larger than the canvas), so += is exact.
        canvas_tensor[:, :, rows[:, None], cols[None, :]] += values

    def coverage(self, views: list[CropView], like: torch.Tensor) -> torch.Tensor:
        """How many views cover each canvas position: shape (1, 1, H, W), dtype and device of ``like``."""
        count = torch.zeros(1, 1, self.height, self.width, dtype=like.dtype, device=like.device)
        for view in views:
            self.add(count, view, 1.0)
        return count


def _axis_index(start: int, length: int, size: int, device: torch.device) -> slice | torch.Tensor:
    """A slice when the window lies inside the axis, else the wrapped index tensor on ``device`` (start may be < 0)."""
    if 0 <= start and start + length <= size:
        return slice(start, start + length)
    return _wrapped_index(start, length, size, device)


@functools.lru_cache(maxsize=4096)
def _wrapped_index(start: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """Positions start .. start + length - 1 modulo ``size`` as a long tensor on ``device``. Cached: the
    denoising loop (and MAD's attention layers) read and fuse the same windows every step, and building the
    tensor and copying it to a GPU each time would make the CPU wait for the GPU."""
    return ((start + torch.arange(length)) % size).to(device)


class DeviceCache:
    """Tensors moved to the device (and dtype) they are used with once, then kept: the denoising loop asks
    for the same precomputed grids, masks and indices every step (``CanvasViews``, ``SyncSDE``)."""

    def __init__(self):
        self._copies: dict = {}

    def on(self, key, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``tensor`` (remembered under ``key``) on ``like``'s device, in ``like``'s dtype when ``tensor`` is
        floating point (index and boolean tensors keep theirs)."""
        cache_key = (key, like.device, like.dtype)
        if cache_key not in self._copies:
            dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
            self._copies[cache_key] = tensor.to(like.device, dtype)
        return self._copies[cache_key]
