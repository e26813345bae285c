"""View sets of an equirect canvas: which views a 360° generation denoises, as plain data.

A view set is a list of **crop views** (square windows of the latent canvas, read exactly:
``backend/sphere/canvas.py``) and **projected views** (square perspective images of the sphere,
``geometry.PerspectiveView``, read through a ``grid_sample`` grid). Conventions are those of
``backend/sphere/geometry.py`` (docs/conventions.md#directions): the canvas is (1, C, H, W) latents with
W = 2H, column j at longitude ``(j + 0.5) / W · 360° − 180°`` and row i at latitude
``90° − (i + 0.5) / H · 180°``; yaw positive turns right, pitch positive looks up; a projected view is
evaluated at any size (the latent window of the UNet, or a feature resolution). Plain numpy/torch, no model.

The view sets (names for ``parse_view_set``):

- ``band``: the crop windows of the canvas, ``Canvas("equirect", H, W).crop_views(window, stride)``;
  the windows of the top and bottom rows reach the poles, where equirect content is stretched.
- ``cube``: the six cube faces F R B L U D, perspective views with FOV 90° at ``geometry.FACE_VIEWS``.
  The faces tile the sphere edge to edge: every direction is seen once, and no two faces overlap (so a
  cube alone gives fusion nothing to synchronise across a face edge).
- ``ring``: MVDiffusion's 8 views, FOV 90°, at pitch 0 and yaw 0°, 45°, … (labels ``yaw0``, ``yaw45``,
  …, ``yaw180``, ``yaw-135``, …, ``yaw-45``), plus the up and down faces U and D. Neighbouring ring
  views overlap by half a view; the views at yaw 0, ±90°, 180° are the faces F R L B, so along most of
  their top and bottom edges the ring meets U and D edge to edge (the 45° views overlap U and D near
  their corners).
- ``band+poles``: the rows of crop windows that stay within latitude ±``band_latitude`` (default
  ``BAND_LATITUDE`` = 60°), plus the U and D faces. Why that covers the sphere: the U face (FOV 90°,
  pitch 90°) sees exactly the directions with ``y >= max(|x|, |z|)``, i.e. ``tan(lat) >= max(|sin lon|,
  |cos lon|)``; the right side is at most 1, so U sees every direction with lat >= 45° (its edge
  midpoints lie at 45°, its corners reach down to 35.26°), and D likewise below −45°. A band reaching
  ±45° therefore completes the sphere; ``band_latitude`` must be at least 45°. The default 60° adds a
  15° strip (a sixth of a face) in which the band and each pole face overlap all along the face's edge,
  so fusion can synchronise them, while keeping the band's horizontal stretch at most 2× (1 / cos 60°).
  The window rows are ``canvas.window_starts`` over the canvas rows between ±``band_latitude``, rounded
  outward to whole latent rows; that needs a canvas at least that many rows high for one window, e.g.
  a 128-row latent canvas (a 2048 × 1024 px image) for a 64-latent window, or exactly 2 × window rows
  for ``band_latitude`` 45° (one row of windows between ±45°).

``request.parse_view_set`` turns a user's name into the canonical one (standard library, so requests
validate without torch), ``build_view_set`` lists the views for a canvas, ``projected_view_grid`` gives
the grid that reads a projected view from the canvas, ``canvas_coverage`` counts the views that see each
canvas pixel, and ``CanvasViews`` moves latents between the canvas and the views for the denoising loop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

import torch.nn.functional as F

from .canvas import Canvas, CropView, DeviceCache, window_starts
from .geometry import (
    FACE_VIEWS,
    PerspectiveView,
    equirect_latitude,
    equirect_longitude,
    equirect_padding_indices,
    equirect_to_direction,
    lonlat_to_direction,
    sampling_grid,
    view_equirect_coordinates,
)
from ..request import parse_view_set

BAND_LATITUDE = 60.0
"""Default latitude limit (degrees) of the crop windows in ``band+poles`` (module docstring)."""

MIN_BAND_LATITUDE = 45.0
"""The band must reach this latitude (degrees) for the pole faces to cover the rest of the sphere."""

PROJECTED_FOV = 90.0
"""Field of view (degrees) of every projected view: the cube faces and MVDiffusion's ring."""

RING_VIEWS = 8
"""Number of ring views at pitch 0, 360° / 8 = 45° apart (MVDiffusion)."""

GRID_PAD = 1
"""Latent pixels of sphere padding the canvas needs around it for ``projected_view_grid``'s grids."""

@dataclass(frozen=True)
class ViewSet:
    """The views of one generation on an equirect canvas.

    ``name``: the canonical view set name (``VIEW_SETS``). ``crops``: crop windows of the canvas in
    latent pixels (``canvas.CropView``; windows may wrap in longitude), listed row by row as
    ``Canvas.crop_views`` lists them. ``projected``: (label, view) pairs, label a cube face name (F R B
    L U D) or ``yaw<degrees>`` for a ring view, view a ``geometry.PerspectiveView`` (degrees, FOV 90°);
    a projected view has no size of its own: it is sampled at the UNet's window size (and at its feature
    resolutions).
    """

    name: str
    crops: tuple[CropView, ...]
    projected: tuple[tuple[str, PerspectiveView], ...]


def _check_equirect(canvas_height: int, canvas_width: int) -> None:
    """Raise ValueError unless height x width latents is a full-sphere equirect canvas (W = 2H, H >= 1)."""
    if int(canvas_height) != canvas_height or canvas_height < 1 or canvas_width != 2 * canvas_height:
        raise ValueError(f"An equirect canvas must be H x 2H latents, not {canvas_height} x {canvas_width}.")


def _face(name: str) -> tuple[str, PerspectiveView]:
    """(name, the cube face ``name`` as a perspective view): FOV 90° at ``FACE_VIEWS[name]``, roll 0."""
    yaw, pitch = FACE_VIEWS[name]
    return name, PerspectiveView(yaw, pitch, 0.0, PROJECTED_FOV)


def pole_faces() -> tuple[tuple[str, PerspectiveView], ...]:
    """The up and down cube faces as (label, view) pairs: ``("U", …), ("D", …)``, FOV 90°."""
    return (_face("U"), _face("D"))


def ring_views() -> tuple[tuple[str, PerspectiveView], ...]:
    """MVDiffusion's ring: ``RING_VIEWS`` (label, view) pairs at pitch 0, FOV 90°, yaw 0, 45, …, 180, −135, …, −45°.

    Labels are ``yaw<degrees>`` (``yaw0``, ``yaw45``, ``yaw-45``); yaws in (−180°, 180°], turning right
    from the canvas centre. The views at yaw 0, 90, 180, −90 are the faces F, R, B, L exactly.
    """
    step = 360.0 / RING_VIEWS
    yaws = [k * step if k * step <= 180.0 else k * step - 360.0 for k in range(RING_VIEWS)]
    return tuple((f"yaw{yaw:g}", PerspectiveView(yaw, 0.0, 0.0, PROJECTED_FOV)) for yaw in yaws)


def band_rows(canvas_height: int, band_latitude: float = BAND_LATITUDE, row_multiple: int = 1) -> tuple[int, int]:
    """The canvas rows [first, stop) between latitudes ±``band_latitude`` degrees, rounded outward to whole rows.

    Row i spans latitudes 90° − i/H·180° (its top edge) to 90° − (i+1)/H·180°: first = floor(H·(90° −
    L)/180°), stop = ceil(H·(90° + L)/180°), so the rows reach at most one row past ±L. With
    ``row_multiple`` m > 1 both are rounded outward further, to multiples of m (MAD merges windows at
    feature maps m times smaller, where their rows must stay whole). ``band_latitude`` L must be in
    [45°, 90°] (``MIN_BAND_LATITUDE``: below 45° the pole faces leave a gap); raises ValueError otherwise.
    """
    if not MIN_BAND_LATITUDE <= band_latitude <= 90.0:
        raise ValueError(f"The band+poles latitude limit must be between {MIN_BAND_LATITUDE:g} and 90 degrees "
                         f"(below {MIN_BAND_LATITUDE:g} the pole faces leave a gap), not {band_latitude!r}.")
    first = math.floor(canvas_height * (90.0 - band_latitude) / 180.0 + 1e-9)
    stop = math.ceil(canvas_height * (90.0 + band_latitude) / 180.0 - 1e-9)
    first, stop = first // row_multiple * row_multiple, -(-stop // row_multiple) * row_multiple
    return max(first, 0), min(stop, canvas_height)


def build_view_set(name: str, canvas_height: int, canvas_width: int, window: int, stride: int,
                   *, band_latitude: float = BAND_LATITUDE, row_multiple: int = 1) -> ViewSet:
    """The views of view set ``name`` on an equirect latent canvas ``canvas_height`` x ``canvas_width``.

    ``name``: any spelling ``parse_view_set`` accepts; ``window``, ``stride``: the crop windows' side and
    step in latent pixels (as ``Canvas.crop_views``); ``band_latitude``, ``row_multiple``: for ``band+poles``
    only (module docstring, ``band_rows``). Returns a ``ViewSet`` (crop views in latent pixels, projected views with FOV
    90°). Raises ValueError for an unknown name, a canvas that is not H x 2H, or (``band+poles``) a canvas
    too short for one window between ±``band_latitude``.
    """
    canonical = parse_view_set(name)
    _check_equirect(canvas_height, canvas_width)
    canvas = Canvas("equirect", canvas_height, canvas_width)
    poles = pole_faces()
    if canonical == "band":
        return ViewSet(canonical, tuple(canvas.crop_views(window, stride)), ())
    if canonical == "cube":
        return ViewSet(canonical, (), tuple(_face(face) for face in FACE_VIEWS))
    if canonical == "ring":
        return ViewSet(canonical, (), ring_views() + poles)
    first, stop = band_rows(canvas_height, band_latitude, row_multiple)
    if stop - first < window:
        need = math.ceil(window * 180.0 / (2.0 * band_latitude))
        raise ValueError(f"band+poles needs a canvas at least about {need} latents high for a {window}-latent window "
                         f"to fit between latitudes ±{band_latitude:g}°, and this one is {canvas_height}; "
                         "make the canvas taller or use ring or cube.")
    tops = [first + top for top in window_starts(stop - first, window, stride, wraps=False)]
    lefts = window_starts(canvas_width, window, stride, wraps=True)
    crops = tuple(CropView(top, left, window, window) for top in tops for left in lefts)
    return ViewSet(canonical, crops, poles)


def projected_view_grid(view: PerspectiveView, view_size: int, canvas_height: int, canvas_width: int) -> torch.Tensor:
    """The ``grid_sample`` grid (view_size, view_size, 2), float32 (x, y), that reads ``view`` from the canvas.

    ``view`` at ``view_size`` px (pixel-centre grid, ``geometry.perspective_directions``); the equirect
    canvas ``canvas_height`` x ``canvas_width`` (W = 2H) at the same scale (latents, or one UNet feature
    resolution of both). Grid element [i, j] is where view pixel (row i, column j) looks, normalised for
    ``align_corners=False`` on the canvas **padded by** ``GRID_PAD`` px with its sphere neighbours:

        rows, cols = geometry.equirect_padding_indices(H, W, GRID_PAD)
        view = grid_sample(canvas[..., rows, cols], grid[None].to(canvas), mode="bilinear", align_corners=False)

    so bilinear samples wrap in longitude and cross the poles (``geometry.sample_equirect``'s
    neighbours). Every grid point lies inside the padded canvas. Cast the grid to the canvas's dtype and
    device (``grid_sample`` needs them equal).
    """
    _check_equirect(canvas_height, canvas_width)
    col, row = view_equirect_coordinates(view, view_size, canvas_width, canvas_height)
    return sampling_grid(col, row, canvas_width, canvas_height, pad=GRID_PAD)


def _sees(view: PerspectiveView, directions: np.ndarray, view_size: int) -> np.ndarray:
    """Bool (...): whether each direction (..., 3) falls on ``view``'s image at ``view_size`` px (edges included)."""
    return _on_image(*view.project(directions, view_size), view_size)


def _on_image(col: np.ndarray, row: np.ndarray, in_front: np.ndarray, view_size: int) -> np.ndarray:
    """Bool (...): whether projected coordinates (``PerspectiveView.project``'s) lie on a ``view_size`` px
    image, edges included."""
    with np.errstate(invalid="ignore"):
        return in_front & (col >= -0.5) & (col <= view_size - 0.5) & (row >= -0.5) & (row <= view_size - 0.5)


def canvas_coverage(view_set: ViewSet, canvas_height: int, canvas_width: int, view_size: int) -> torch.Tensor:
    """How many views of ``view_set`` see each canvas pixel: (canvas_height, canvas_width) float32 whole numbers.

    Crop views count the canvas pixels of their window (``Canvas.coverage``). A projected view at
    ``view_size`` px counts the canvas pixels whose *centre's* direction projects onto its image
    (in front of it, col and row within [−0.5, view_size − 0.5], edges included): the exact inverse of
    its pixel grid, independent of interpolation. The canvas is the equirect ``canvas_height`` x
    ``canvas_width`` latents the views were built for (``build_view_set``).
    """
    _check_equirect(canvas_height, canvas_width)
    canvas = Canvas("equirect", canvas_height, canvas_width)
    count = canvas.coverage(list(view_set.crops), torch.zeros((), dtype=torch.float32))[0, 0]
    if view_set.projected:
        rows, cols = np.mgrid[0:canvas_height, 0:canvas_width]
        directions = equirect_to_direction(cols, rows, canvas_width, canvas_height)
        seen = sum(_sees(view, directions, view_size).astype(np.float32) for _, view in view_set.projected)
        count += torch.from_numpy(seen)
    return count


def _pooled(weight: torch.Tensor, divisor: int) -> torch.Tensor:
    """``weight`` (1, 1, H, W) averaged over ``divisor`` x ``divisor`` blocks: (1, 1, H / divisor, W / divisor)."""
    return F.avg_pool2d(weight, divisor)


class CanvasViews:
    """The views of one generation, and the two maps the denoising loop needs: canvas -> views and back.

    ``canvas``: the latent canvas (any kind); ``crops``: its crop windows; ``projected``: (label, view)
    pairs of perspective views (equirect canvases only), each sampled at ``size`` x ``size`` latents.
    Views are numbered crops first, then projected, in the given order; every view is square with the
    same side (the UNet's window), so the loop batches them together.

    - ``read(canvas_tensor)``: each view's latent. Crop windows are read exactly; projected views are
      bilinear samples of the canvas padded with its sphere neighbours (``projected_view_grid``).
    - ``fuse(view_tensors)``: the canvas whose every pixel is the average of the views that see it.
      A crop window puts its pixels back where it read them; a projected view is sampled, bilinearly
      with its edge repeated, at the point where each canvas pixel's centre direction falls on its image
      (every canvas pixel whose direction falls on the image counts, as ``canvas_coverage`` counts).

    With crop windows only both maps are exactly ``Canvas.read`` and MultiDiffusion's average, so a
    ``band`` generation is the engine's crop-window generation bit for bit.

    ``crop_weight``: None (every view counts 1), or a (1, 1, H, W) float32 weight per canvas pixel: ``fuse``
    then gives the crop windows' average that weight there and each projected view weight 1. The shifted
    schedule sets it to the crop coverage of the dense views it replaces (``with_crop_weight``): its one
    window per pixel then stands for dense's many, and a pole face meets the band as it does under dense
    (diluted by the windows where they overlap), not averaged 1:1 with a single window, which switches to
    the face's content with a jump in the band. ``coverage`` stays the count of views either way.
    """

    def __init__(self, canvas: Canvas, crops, projected=(), size: int | None = None,
                 crop_weight: torch.Tensor | None = None):
        self.canvas = canvas
        self.crops = list(crops)
        self.projected = list(projected)
        self.crop_weight = crop_weight
        self.size = size if size is not None else (self.crops[0].height if self.crops else None)
        if self.projected and canvas.kind != "equirect":
            raise ValueError("Projected views need an equirect canvas.")
        if self.projected and self.size is None:
            raise ValueError("Projected views need a size.")
        height, width = canvas.height, canvas.width
        if self.projected:
            rows, cols = equirect_padding_indices(height, width, GRID_PAD)
            self._pad_rows, self._pad_cols = torch.as_tensor(rows), torch.as_tensor(cols)
            self._read_grids = torch.stack([projected_view_grid(view, self.size, height, width) for _, view in self.projected])
            directions = equirect_to_direction(*np.mgrid[0:height, 0:width][::-1], width, height)
            fuse_grids, masks = [], []
            for _, view in self.projected:
                col, row, in_front = view.project(directions, self.size)
                seen = _on_image(col, row, in_front, self.size)
                fuse_grids.append(sampling_grid(col, row, self.size, self.size, valid=seen))
                masks.append(torch.from_numpy(seen.astype(np.float32)))
            self._fuse_grids = torch.stack(fuse_grids)  # (P, H, W, 2) into each view's image
            self._fuse_masks = torch.stack(masks)[:, None]  # (P, 1, H, W): 1 where the view sees the pixel
        self._count_views()

    def _count_views(self) -> None:
        """The labels and coverage of the views (what changes with the crop windows), and fresh caches."""
        self.labels = [f"crop{index}" for index in range(len(self.crops))] + [label for label, _ in self.projected]
        self._crop_coverage = self.canvas.coverage(self.crops, torch.zeros((), dtype=torch.float32))
        self._coverage_mask = self._crop_coverage
        if self.projected:
            self._coverage_mask = self._coverage_mask + self._fuse_masks.sum(0, keepdim=True)
        # What fuse divides by: the (weighted) coverage, at least 1 where no view sees (only a subset leaves
        # pixels unseen).
        self._coverage_divisor = self._coverage_mask.clamp(min=1)
        if self.crop_weight is not None:
            # fuse = (weight x the windows' average + the sum of the projected views) / (weight + their count).
            face_count = self._coverage_mask - self._crop_coverage
            weight = self.crop_weight * (self._crop_coverage > 0)
            total_weight = weight + face_count
            total_weight = torch.where(total_weight > 0, total_weight, torch.ones(()))
            self._crop_factor = weight / total_weight / self._crop_coverage.clamp(min=1)
            self._projected_factor = 1.0 / total_weight
        self._device = DeviceCache()
        self._at_resolution: dict[int, CanvasViews] = {}

    def with_crops(self, crops) -> "CanvasViews":
        """The same canvas and projected views with the crop windows ``crops`` instead (the shifted schedule's
        windows of one step); the projected views' grids are shared, not built again."""
        other = copy.copy(self)
        other.crops = list(crops)
        other._count_views()
        return other

    def with_crop_weight(self, weight: torch.Tensor) -> "CanvasViews":
        """The same views, fused with the crop windows' average weighted by ``weight`` (1, 1, H, W) float32
        against each projected view's 1 (class docstring). Raises ValueError for another shape."""
        if tuple(weight.shape) != (1, 1, self.canvas.height, self.canvas.width):
            raise ValueError(f"A crop weight must be (1, 1, {self.canvas.height}, {self.canvas.width}), not {tuple(weight.shape)}.")
        other = copy.copy(self)
        other.crop_weight = weight.to(torch.float32)
        other._count_views()
        return other

    def crop_coverage(self) -> torch.Tensor:
        """How many crop windows see each canvas pixel: (1, 1, H, W) float32 whole numbers."""
        return self._crop_coverage

    def __len__(self) -> int:
        return len(self.crops) + len(self.projected)

    def _on(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The precomputed tensor ``name`` on ``like``'s device, in its dtype when ``name`` is floating point
        (index tensors stay integer); converted once, then kept: the loop calls this every step."""
        return self._device.on(name, getattr(self, name), like)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        """How many views see each canvas pixel: (1, 1, H, W) in ``like``'s dtype and device (every value >= 1
        for a whole view set; a ``subset`` can leave pixels at 0)."""
        return self._on("_coverage_mask", like)

    def read(self, canvas_tensor: torch.Tensor) -> torch.Tensor:
        """Every view's latent from ``canvas_tensor`` (1, C, H, W): (len(self), C, size, size), crops first."""
        parts = [self.canvas.read(canvas_tensor, self.crops)] if self.crops else []
        if self.projected:
            parts.append(self.read_projected(canvas_tensor))
        return torch.cat(parts)

    def read_projected(self, canvas_tensor: torch.Tensor) -> torch.Tensor:
        """The projected views' latents (len(projected), C, size, size), bilinear samples of ``canvas_tensor``
        (1, C, H, W) padded with its sphere neighbours."""
        padded = canvas_tensor[:, :, self._on("_pad_rows", canvas_tensor), self._on("_pad_cols", canvas_tensor)]
        grids = self._on("_read_grids", canvas_tensor)
        return F.grid_sample(padded.expand(len(self.projected), -1, -1, -1), grids, mode="bilinear", align_corners=False)

    def put_crops(self, canvas_tensor: torch.Tensor, crop_tensors: torch.Tensor) -> torch.Tensor:
        """``canvas_tensor`` (1, C, H, W) with the positions the crop windows cover replaced by the average of
        ``crop_tensors`` (len(crops), C, size, size) there; the rest unchanged. A new tensor."""
        total = torch.zeros_like(canvas_tensor)
        for index, view in enumerate(self.crops):
            self.canvas.add(total, view, crop_tensors[index : index + 1])
        count = self._on("_crop_coverage", canvas_tensor)
        return torch.where(count > 0, total / count.clamp(min=1), canvas_tensor)

    def fuse(self, view_tensors: torch.Tensor) -> torch.Tensor:
        """The canvas (1, C, H, W) that averages ``view_tensors`` (len(self), C, size, size) where views overlap
        (with a ``crop_weight``: the windows' average weighted by it, class docstring)."""
        total = torch.zeros(1, view_tensors.shape[1], self.canvas.height, self.canvas.width,
                            dtype=view_tensors.dtype, device=view_tensors.device)
        for index, view in enumerate(self.crops):
            self.canvas.add(total, view, view_tensors[index : index + 1])
        if self.crop_weight is None:
            if self.projected:
                total += self._warped_projected(view_tensors).sum(0, keepdim=True)
            return total / self._on("_coverage_divisor", view_tensors)
        fused = total * self._on("_crop_factor", view_tensors)
        if self.projected:
            fused += self._warped_projected(view_tensors).sum(0, keepdim=True) * self._on("_projected_factor", view_tensors)
        return fused

    def _warped_projected(self, view_tensors: torch.Tensor) -> torch.Tensor:
        """The projected views of ``view_tensors`` (len(self), C, size, size) warped onto the canvas, each 0
        where it does not see: (len(projected), C, H, W)."""
        warped = F.grid_sample(view_tensors[len(self.crops):], self._on("_fuse_grids", view_tensors),
                               mode="bilinear", padding_mode="border", align_corners=False)
        return warped * self._on("_fuse_masks", view_tensors)

    def at_resolution(self, divisor: int) -> "CanvasViews":
        """The same views on the canvas ``divisor`` times smaller on each side (a UNet feature resolution:
        2, 4, 8 for SD's down blocks), each view ``size / divisor`` px. Crop windows keep their place
        exactly, so every window position and side must be a multiple of ``divisor``; projected views are
        resolution-free (the pixel-centre grid). Raises ValueError when the canvas, the view size or a
        window does not divide."""
        if divisor == 1:
            return self
        if divisor not in self._at_resolution:  # MAD asks for each resolution more than once per job
            self._at_resolution[divisor] = self._scaled(divisor)
        return self._at_resolution[divisor]

    def _scaled(self, divisor: int) -> "CanvasViews":
        """``at_resolution``'s work, uncached."""
        sides = [self.canvas.height, self.canvas.width, self.size or 0]
        sides += [value for view in self.crops for value in (view.top, view.left, view.height, view.width)]
        if any(side % divisor for side in sides):
            raise ValueError(f"The views do not divide into a {divisor}x smaller feature map: the canvas, the view "
                             f"size and every window position must be multiples of {divisor}.")
        canvas = Canvas(self.canvas.kind, self.canvas.height // divisor, self.canvas.width // divisor)
        crops = [CropView(view.top // divisor, view.left // divisor, view.height // divisor, view.width // divisor) for view in self.crops]
        return CanvasViews(canvas, crops, self.projected, self.size // divisor if self.size else None,
                           None if self.crop_weight is None else _pooled(self.crop_weight, divisor))

    def subset(self, indices) -> "CanvasViews":
        """The views numbered ``indices`` (ascending view numbers: crops first, then projected) on the same
        canvas. Canvas pixels none of them sees have coverage 0 and fuse to 0."""
        indices = list(indices)
        crops = [self.crops[index] for index in indices if index < len(self.crops)]
        projected = [self.projected[index - len(self.crops)] for index in indices if index >= len(self.crops)]
        return CanvasViews(self.canvas, crops, projected, self.size, self.crop_weight)

    def seeing(self, yaw: float, pitch: float) -> list[int]:
        """The numbers of the views that see the direction (yaw, pitch) in degrees (equirect canvases only).

        A crop window sees it when it lies in the window's longitude span (wrapping across the seam) and
        latitude span (edges included), read from the window's place on the canvas
        (docs/conventions.md#directions); at a pole every longitude is the same point, so a window reaching the
        pole sees it. A projected view sees it as ``canvas_coverage`` counts (``_sees``: in front of it, on its
        image, edges included).
        """
        canvas = self.canvas
        seen = []
        for index, view in enumerate(self.crops):
            # The window's edges lie half a pixel outside its first and last pixel centres.
            west = float(equirect_longitude(view.left - 0.5, canvas.width, degrees=True))  # spans width / W of 360°
            north = float(equirect_latitude(view.top - 0.5, canvas.height, degrees=True))
            south = float(equirect_latitude(view.top + view.height - 0.5, canvas.height, degrees=True))
            at_pole = (pitch >= 90.0 and north >= 90.0) or (pitch <= -90.0 and south <= -90.0)
            if south <= pitch <= north and (at_pole or (yaw - west) % 360.0 <= view.width / canvas.width * 360.0):
                seen.append(index)
        direction = lonlat_to_direction(math.radians(yaw), math.radians(pitch))
        seen += [len(self.crops) + offset for offset, (_, view) in enumerate(self.projected)
                 if _sees(view, direction, self.size)]
        return seen

    def centres(self) -> list[tuple[float, float]]:
        """(yaw, pitch) in degrees of every view's centre, equirect canvases only (docs/conventions.md#directions).

        A crop window's centre is the middle of its window (wrapped to yaw in [−180°, 180°)); a projected
        view's is its own yaw and pitch.
        """
        if self.canvas.kind != "equirect":
            raise ValueError("View directions exist only on an equirect canvas.")
        centres = []
        for view in self.crops:
            # The window spans columns left - 0.5 .. left + width - 0.5 in pixel-centre coordinates.
            yaw = float(equirect_longitude(view.left + view.width / 2 - 0.5, self.canvas.width, degrees=True))
            pitch = float(equirect_latitude(view.top + view.height / 2 - 0.5, self.canvas.height, degrees=True))
            centres.append((yaw - 360.0 if yaw >= 180.0 else yaw, pitch))  # a window across the seam
        return centres + [(view.yaw, view.pitch) for _, view in self.projected]


def canvas_views(canvas: Canvas, view_set: str | None, window: int, stride: int, row_multiple: int = 1) -> CanvasViews:
    """The views of a generation on ``canvas``: on an equirect canvas ``view_set`` (``build_view_set``; None
    means the crop windows, ``band``; ``row_multiple`` as there), elsewhere the crop windows
    ``canvas.crop_views(window, stride)``. Raises ValueError with one sentence when the view set does not
    fit the canvas."""
    if canvas.kind != "equirect":
        return CanvasViews(canvas, canvas.crop_views(window, stride), (), window)
    views = build_view_set(view_set or "band", canvas.height, canvas.width, window, stride, row_multiple=row_multiple)
    return CanvasViews(canvas, views.crops, views.projected, window)
