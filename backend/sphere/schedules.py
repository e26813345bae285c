"""View schedules: which views the denoising loop runs at each step.

The **dense** schedule runs the same overlapping views every step (MultiDiffusion: crop windows every
``stride`` latents, plus the view set's projected views); it is a plain ``CanvasViews`` and needs nothing
from this module.

The **shifted** schedule (SpotDiffusion, Frolov et al. 2024, arXiv 2407.15507) covers the canvas once per
step with windows that do not overlap, and moves them by a random offset every step, so a window border
never stays in one place long enough to become a seam. It costs about one covering of the canvas per step
instead of (window / stride)² coverings. Per layout (``shifted_crops``):

- ``tile``: both axes wrap, the grid of windows is shifted on the torus; a canvas of one window is one
  view, shifted every step.
- ``wide``: both axes are planar and must not wrap (the left edge is not the right one's neighbour). The
  shifted grid's windows that would cross an edge are pushed inside it, so the first and last window of an
  axis overlap their neighbour by the offset (fused by averaging there, as MultiDiffusion does) and no
  canvas position is left out. Padding the canvas instead would spend UNet rows on latents that are thrown
  away, and the pushed window is never more than one extra view per axis.
- ``equirect``: longitude wraps (shifted around the seam); latitude is planar (the poles are not
  neighbours) and shifted within the rows the dense view set's crop windows cover: the band of
  ``band+poles`` or the whole height for ``band``, never reaching past them. The projected views (the up and
  down faces) stay as they are every step; they overlap the band by design and are fused with it on the
  canvas with the weights of the dense views (``CanvasViews.with_crop_weight``): each window's pixel counts
  as many as the dense windows that would have seen it. Averaged 1:1 instead, one window and a face meet
  with a jump in content where the face begins: measured on the development model, the cube edges next to
  the poles were 2× dense's.

Offsets are drawn from the job's seed (``shifted_offsets``), so the same seed gives the same image. With
MAD the offsets are multiples of the deepest feature map's divisor, so every window stays whole there.
Plain Python and torch, no model.
"""

from __future__ import annotations

import random

from .canvas import Canvas, CropView, window_starts
from .view_sets import CanvasViews


def shifted_starts(size: int, window: int, offset: int, wraps: bool, needed: tuple[int, int] | None = None) -> list[int]:
    """Window starts along one axis of ``size`` latents for the shifted schedule at ``offset`` (0 <= offset < window).

    A wrapping axis is tiled from ``offset`` all the way round: windows at offset, offset + window, … modulo
    ``size`` (a start may be followed by a window that continues at 0), exactly once each position when
    ``size`` is a multiple of ``window``; otherwise the last window overlaps its predecessor (as
    ``canvas.window_starts`` aligns it). A planar axis is cut at offset + k·window; each window of that grid
    that meets the ``needed`` positions [first, stop) (default: the whole axis) is pushed inside them when it
    crosses their edge (inside [0, size) when they are fewer than a window). Returns the distinct starts in ascending order (wrapping axis: in tiling
    order); every needed position is covered.
    """
    if not 0 <= offset < window <= size:
        raise ValueError(f"A shifted window needs 0 <= offset < window <= size, not {offset}, {window}, {size}.")
    if wraps:
        return [(offset + start) % size for start in window_starts(size, window, window, wraps=False)]
    first, stop = needed or (0, size)
    # Windows stay within the needed rows when they hold one (equirect's band: none reaches into the pole rows).
    low, high = (first, stop - window) if stop - first >= window else (0, size - window)
    starts = []
    for cut in range(offset - window, stop, window):
        if cut + window <= first:
            continue
        start = min(max(cut, low), high)
        if start not in starts:
            starts.append(start)
    return starts


def shifted_crops(canvas: Canvas, window: int, offset: tuple[int, int], rows: tuple[int, int] | None = None) -> list[CropView]:
    """The shifted schedule's crop windows of ``canvas`` at ``offset`` = (row offset, column offset), each in
    [0, window): row by row, top to bottom, as ``Canvas.crop_views`` lists them. ``rows`` = [first, stop): the
    canvas rows the windows must cover (default all; equirect's band)."""
    tops = shifted_starts(canvas.height, window, offset[0], canvas.wraps_y, rows)
    lefts = shifted_starts(canvas.width, window, offset[1], canvas.wraps_x)
    return [CropView(top, left, window, window) for top in tops for left in lefts]


def shifted_offsets(seed: int, steps: int, window: int, multiple: int = 1) -> list[tuple[int, int]]:
    """One (row, column) offset per step, each uniform over the multiples of ``multiple`` in [0, window), drawn
    from a generator seeded with ``seed`` (Python's ``random.Random``: the same seed, the same offsets on
    every machine)."""
    generator = random.Random(seed)
    return [(generator.randrange(0, window, multiple), generator.randrange(0, window, multiple)) for _ in range(steps)]


class ViewSchedule:
    """The shifted schedule of one job: the views of every step (``views_at``).

    dense: the job's dense views (``view_sets.canvas_views``): their crop windows give the rows the shifted
        windows must cover and the window size; their projected views are kept every step.
    offsets: one (row, column) offset per step (``shifted_offsets``).
    fuse_like: the dense views the schedule replaces (e.g. at MultiDiffusion's stride), or None: with projected
        views, each step fuses its windows with their crop coverage as weight (``CanvasViews.with_crop_weight``).
    Each step's views are ``dense.with_crops(shifted_crops(...))``, built once per distinct offset.
    Raises ValueError when the dense views have no crop windows (ring and cube: nothing to shift).
    """

    name = "shifted"

    def __init__(self, dense: CanvasViews, offsets: list[tuple[int, int]], fuse_like: CanvasViews | None = None):
        if not dense.crops:
            raise ValueError("The shifted schedule moves crop windows, and these views have none.")
        self.window = dense.crops[0].height
        self.rows = (min(view.top for view in dense.crops), max(view.top + view.height for view in dense.crops))
        if dense.projected and fuse_like is not None:
            dense = dense.with_crop_weight(fuse_like.crop_coverage())
        self.dense = dense
        self.offsets = list(offsets)
        self._views: dict[tuple[int, int], CanvasViews] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def views_at(self, step_index: int) -> CanvasViews:
        """The views of step ``step_index`` (from 0): shifted crop windows, then the projected views."""
        offset = self.offsets[step_index]
        if offset not in self._views:
            crops = shifted_crops(self.dense.canvas, self.window, offset, self.rows)
            self._views[offset] = self.dense.with_crops(crops)
        return self._views[offset]

    def views_per_step(self) -> list[int]:
        """How many views each step runs."""
        return [len(self.views_at(step)) for step in range(len(self))]
