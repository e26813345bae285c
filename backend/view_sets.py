"""View sets of an equirect canvas: which views a 360° generation denoises, as plain data.

A view set is a list of **crop views** (square windows of the latent canvas, read exactly:
``backend/canvas.py``) and **projected views** (square perspective images of the sphere,
``geometry.PerspectiveView``, read through a ``grid_sample`` grid). Conventions are those of
``backend/geometry.py`` (design section 3): the canvas is (1, C, H, W) latents with W = 2H, column j at
longitude ``(j + 0.5) / W · 360° − 180°`` and row i at latitude ``90° − (i + 0.5) / H · 180°``; yaw
positive turns right, pitch positive looks up; a projected view is evaluated at any size (the latent
window of the UNet, or a feature resolution). Plain numpy/torch, no model.

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

``parse_view_set`` turns a user's name into the canonical one, ``build_view_set`` lists the views for a
canvas, ``projected_view_grid`` gives the grid that reads a projected view from the canvas, and
``canvas_coverage`` counts the views that see each canvas pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .canvas import Canvas, CropView, window_starts
from .geometry import FACE_VIEWS, PerspectiveView, equirect_to_direction, sampling_grid, view_equirect_coordinates

VIEW_SETS = ("band", "cube", "ring", "band+poles")
"""Canonical view set names, in the order the help lists them."""

VIEW_SET_PARTS = ("band", "cube", "ring", "poles")
"""The words a view set name is made of, joined by ``+``."""

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

# Canonical name of each valid set of parts.
_CANONICAL = {frozenset({"band"}): "band", frozenset({"cube"}): "cube", frozenset({"ring"}): "ring",
              frozenset({"band", "poles"}): "band+poles"}

# Why a set of known parts is not a view set (the part of a sentence in parentheses).
_NOT_A_SET = {
    frozenset({"poles"}): "the up and down faces alone leave the middle latitudes unseen",
    frozenset({"cube", "poles"}): "cube already has the up and down faces",
    frozenset({"ring", "poles"}): "ring already has the up and down faces",
    frozenset({"cube", "ring"}): "ring already has the cube's faces",
    frozenset({"band", "cube"}): "crop windows combine only with the pole faces",
    frozenset({"band", "ring"}): "crop windows combine only with the pole faces",
}


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


def parse_view_set(name: str) -> str:
    """The canonical name (one of ``VIEW_SETS``) of a view set name given by a user.

    ``name``: parts from ``VIEW_SET_PARTS`` joined by ``+``, in any order, any case, spaces around
    parts ignored: ``"band"``, ``"cube"``, ``"ring"``, ``"band+poles"`` (also ``"Poles + band"``).
    Raises ValueError, with one sentence, for an unknown part or a combination that is not a view set
    (e.g. ``"cube+poles"``: cube already has the up and down faces).
    """
    choices = ", ".join(VIEW_SETS[:-1]) + " or " + VIEW_SETS[-1]
    parts = [part.strip().lower() for part in str(name).split("+")]
    for part in parts:
        if part not in VIEW_SET_PARTS:
            shown = f"{part!r} in {name!r}" if len(parts) > 1 else repr(name)
            raise ValueError(f"Unknown view set {shown}; use {choices}.")
    key = frozenset(parts)
    if len(key) == len(parts) and key in _CANONICAL:
        return _CANONICAL[key]
    reason = _NOT_A_SET.get(key, "a part is repeated") if len(key) == len(parts) else "a part is repeated"
    raise ValueError(f"{name!r} is not a view set ({reason}); use {choices}.")


def _check_equirect(canvas_height: int, canvas_width: int) -> None:
    """Raise ValueError unless height x width latents is a full-sphere equirect canvas (W = 2H, H >= 1)."""
    if int(canvas_height) != canvas_height or canvas_height < 1 or canvas_width != 2 * canvas_height:
        raise ValueError(f"An equirect canvas must be H x 2H latents, not {canvas_height} x {canvas_width}.")


def _face(name: str) -> tuple[str, PerspectiveView]:
    """(name, the cube face ``name`` as a perspective view): FOV 90° at ``FACE_VIEWS[name]``, roll 0."""
    yaw, pitch = FACE_VIEWS[name]
    return name, PerspectiveView(yaw, pitch, 0.0, PROJECTED_FOV)


def ring_views() -> tuple[tuple[str, PerspectiveView], ...]:
    """MVDiffusion's ring: ``RING_VIEWS`` (label, view) pairs at pitch 0, FOV 90°, yaw 0, 45, …, 180, −135, …, −45°.

    Labels are ``yaw<degrees>`` (``yaw0``, ``yaw45``, ``yaw-45``); yaws in (−180°, 180°], turning right
    from the canvas centre. The views at yaw 0, 90, 180, −90 are the faces F, R, B, L exactly.
    """
    step = 360.0 / RING_VIEWS
    yaws = [k * step if k * step <= 180.0 else k * step - 360.0 for k in range(RING_VIEWS)]
    return tuple((f"yaw{yaw:g}", PerspectiveView(yaw, 0.0, 0.0, PROJECTED_FOV)) for yaw in yaws)


def band_rows(canvas_height: int, band_latitude: float = BAND_LATITUDE) -> tuple[int, int]:
    """The canvas rows [first, stop) between latitudes ±``band_latitude`` degrees, rounded outward to whole rows.

    Row i spans latitudes 90° − i/H·180° (its top edge) to 90° − (i+1)/H·180°: first = floor(H·(90° −
    L)/180°), stop = ceil(H·(90° + L)/180°), so the rows reach at most one row past ±L. ``band_latitude``
    L must be in [45°, 90°] (``MIN_BAND_LATITUDE``: below 45° the pole faces leave a gap); raises
    ValueError otherwise.
    """
    if not MIN_BAND_LATITUDE <= band_latitude <= 90.0:
        raise ValueError(f"The band+poles latitude limit must be between {MIN_BAND_LATITUDE:g} and 90 degrees "
                         f"(below {MIN_BAND_LATITUDE:g} the pole faces leave a gap), not {band_latitude!r}.")
    first = math.floor(canvas_height * (90.0 - band_latitude) / 180.0 + 1e-9)
    stop = math.ceil(canvas_height * (90.0 + band_latitude) / 180.0 - 1e-9)
    return max(first, 0), min(stop, canvas_height)


def build_view_set(name: str, canvas_height: int, canvas_width: int, window: int, stride: int,
                   *, band_latitude: float = BAND_LATITUDE) -> ViewSet:
    """The views of view set ``name`` on an equirect latent canvas ``canvas_height`` x ``canvas_width``.

    ``name``: any spelling ``parse_view_set`` accepts; ``window``, ``stride``: the crop windows' side and
    step in latent pixels (as ``Canvas.crop_views``); ``band_latitude``: degrees, for ``band+poles`` only
    (module docstring). Returns a ``ViewSet`` (crop views in latent pixels, projected views with FOV
    90°). Raises ValueError for an unknown name, a canvas that is not H x 2H, or (``band+poles``) a canvas
    too short for one window between ±``band_latitude``.
    """
    canonical = parse_view_set(name)
    _check_equirect(canvas_height, canvas_width)
    canvas = Canvas("equirect", canvas_height, canvas_width)
    poles = (_face("U"), _face("D"))
    if canonical == "band":
        return ViewSet(canonical, tuple(canvas.crop_views(window, stride)), ())
    if canonical == "cube":
        return ViewSet(canonical, (), tuple(_face(face) for face in FACE_VIEWS))
    if canonical == "ring":
        return ViewSet(canonical, (), ring_views() + poles)
    first, stop = band_rows(canvas_height, band_latitude)
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
    col, row, in_front = view.project(directions, view_size)
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
