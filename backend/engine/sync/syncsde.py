"""SyncSDE (Lee et al., CVPR 2025): each view keeps its own trajectory and, after every scheduler step, is
pulled towards its already-generated neighbours on their overlap by a closed-form conditional score.

The paper samples the views one after another, each conditioned on the ones before it: the score of view i
is the model's plus the gradient of log p(x_t^neighbours | x_t^i), and for wide images that term is a
Gaussian tying the overlap of a patch to the same pixels of the previous patch. Put through the DDIM
update it adds one term to each view's stepped latent (the wide-image pipeline of the official code,
``syncsde/pipelines/pipeline_wide_image.py``, ``WideImagePipeline.__call__``):

    x_{t-1}^i  <-  x_{t-1}^i  -  gamma_t * lambda * (t / T) * M_i * (x_t^i - P_i(x_t^neighbours))

- ``gamma_t = sqrt(a_prev / a_t) - sqrt((1 - a_prev) / (1 - a_t))`` with a the scheduler's
  ``alphas_cumprod`` at this step's timestep and at the one it steps to. A score s added at x_t moves
  DDIM's x_{t-1} by (1 - a_t) * gamma_t * s; the official code keeps gamma_t and lets lambda absorb the rest.
  For any path x_t = alpha_t x0 + s_t eps stepped by DDIM's deterministic rule the same holds with
  gamma_t = alpha_prev / alpha_t - s_prev / s_t and s_t^2 for (1 - a_t) (``score_step_gain``): Euler-type
  samplers (alpha 1, s sigma) and flow matching (alpha 1 - sigma, s sigma, whose Euler step is that DDIM step).
- ``lambda * t / T``: the single strength hyperparameter, decreasing linearly with the timestep t
  (T = the first, largest timestep of the schedule).
- ``M_i``: 1 on the pixels of view i its neighbours also see, 0 elsewhere; ``P_i``: the neighbours'
  latents at those pixels. Both states are at the same timestep t (x_t, the loop's ``previous``); the
  neighbours' x_t came out of the previous step's synchronisation, so they are already synchronised.
- lambda = 0 returns the scheduler's latents untouched: independent sampling, bit for bit.

**Neighbours (the chain).** Views are conditioned in a chain: crop windows row by row (top to bottom, left
to right within a row, as ``Canvas.crop_views`` lists them), then projected views in their given order.

- A crop window is conditioned on its left neighbour in its row and on the window of the row above that
  overlaps it most (a 2D grid of windows; on one row of windows this is the paper's previous patch).
- A projected view is conditioned on the previous view of its ring (the views at its pitch); the first of
  a ring, and a view alone at its pitch (the up and down faces), on every earlier view it overlaps.
- ``closed_loop``: on axes that wrap (equirect in x, tile in x and y) the chain closes: the first window
  of every row is also conditioned on the last one of its row, each window of the first row on the window
  of the last row that overlaps it most, and the first view of a ring of projected views on the ring's
  last (each only where they overlap). The published code has an open
  chain (``closed_loop=False``), which leaves its last patch and its first unrelated across the wrap.

Neighbours' latents reach a view through the canvas: the neighbours are averaged onto the canvas
(``CanvasViews.fuse`` of their subset) and read back in the view's frame (``CanvasViews.read``). For crop
windows that is exact (the official code's shifted copy, with several neighbours averaged where they
overlap each other). For projected views it resamples the neighbours' noisy latents bilinearly, which
shrinks their noise (docs/engine.md); the pull then mixes in a slightly smoothed target on the overlap.
A view set without overlaps (the cube's six faces) has nothing to pull.

**Composition.** ``compose="paper"`` places the views on the canvas in chain order, each over the ones
before it (the paper's overlapping operation: later patches on top, as ``WideImagePipeline`` builds its
``final_latents``); ``compose="average"`` averages the views where they overlap (``CanvasViews.fuse``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...request import DEFAULT_SYNCSDE_LAMBDA, SYNCSDE_COMPOSE, check_syncsde_lambda
from ...sphere.canvas import DeviceCache
from ...sphere.view_sets import CanvasViews
from .tweedie import is_flow_matching

DEFAULT_STRENGTH = DEFAULT_SYNCSDE_LAMBDA
"""The paper's lambda for wide images: ``--inv_lambda`` defaults to 5.0 in the official ``src/wide_image.py``
and the README's wide-image command passes 5.0 (the pipeline's own keyword default, 0.1, is never used)."""

COMPOSE_MODES = SYNCSDE_COMPOSE


class SyncSDE:
    """The synchroniser the denoising loop calls with ``fusion="own"`` (``backend/engine/sampler.py``).

    views: the generation's views (crop windows first, then projected ones, as ``CanvasViews`` numbers them).
    strength: lambda >= 0 (``DEFAULT_STRENGTH``, the paper's wide-image value); 0 samples every view
        independently.
    closed_loop: close the chain around wrapping axes (module docstring); False gives the published open chain.
    compose: "paper" (later views on top, in chain order) or "average" (``CanvasViews.fuse``).

    ``neighbours[i]`` lists the views (view numbers) view i is conditioned on; ``chain`` is the order
    of the views (view numbers) that ``compose="paper"`` paints them in.
    """

    def __init__(self, views: CanvasViews, strength: float = DEFAULT_STRENGTH, closed_loop: bool = True,
                 compose: str = "paper"):
        if compose not in COMPOSE_MODES:
            raise ValueError(f"Unknown SyncSDE composition {compose!r}; choose one of {', '.join(COMPOSE_MODES)}.")
        self.views = views
        self.strength = check_syncsde_lambda(strength)  # request.py's rule, a ValueError here
        self.closed_loop = bool(closed_loop)
        self.compose_mode = compose
        self._single = [views.subset([index]) for index in range(len(views))]
        footprint = torch.zeros((), dtype=torch.float32)
        self._footprints = [single.coverage(footprint)[0, 0] > 0 for single in self._single]  # (H, W) bool
        crop_order, crop_neighbours = _crop_chain(views, self._footprints, self.closed_loop)
        projected_neighbours = _projected_chain(views, self._footprints, crop_order, self.closed_loop)
        self.chain = crop_order + list(range(len(views.crops), len(views)))
        self.neighbours = crop_neighbours + projected_neighbours
        # Each conditioned view's neighbours as one subset (fused together), and where they cover the view.
        self._neighbour_views = {index: views.subset(sorted(group)) for index, group in enumerate(self.neighbours) if group}
        self._neighbour_indices = {index: torch.tensor(self.neighbours[index]) for index in self._neighbour_views}
        self._weights = {}
        for index, group in self._neighbour_views.items():
            seen = (group.coverage(footprint) > 0).float()  # (1, 1, H, W)
            self._weights[index] = self._single[index].read(seen)  # (1, 1, s, s): 0/1 for crops, bilinear at projected edges
        self._device = DeviceCache()  # the indices, weights and footprints on the latents' device

    def synchronise(self, previous: torch.Tensor, stepped: torch.Tensor, predictions: torch.Tensor, timestep,
                    step_index: int, scheduler) -> torch.Tensor:
        """The views' x_{t-1} after SyncSDE's pull, (N, C, s, s).

        previous: the views' x_t before this step; stepped: their x_{t-1} from the scheduler (both (N, C, s,
        s), view numbers of ``views``); predictions: the model outputs (unused: the wide-image term reads
        only the latents); timestep, step_index: this step's timestep and its index in
        ``scheduler.timesteps``; scheduler: a scheduler copy of this run (its ``alphas_cumprod``, or
        ``sigmas`` for Euler-type schedulers, and ``timesteps``). ``stepped`` is returned unchanged, the same
        tensor, when lambda is 0 or no view has a neighbour.
        """
        if self.strength == 0.0 or not self._neighbour_views:
            return stepped
        coefficient = self.strength * _time_weight(scheduler, timestep) * score_step_gain(scheduler, step_index, timestep)
        pulled = stepped.clone()
        for index, group in self._neighbour_views.items():
            neighbours = self._device.on(("neighbours", index), self._neighbour_indices[index], previous)
            target = self._single[index].read(group.fuse(previous[neighbours]))  # 0 where no neighbour sees
            weight = self._device.on(("weight", index), self._weights[index][0], previous)  # (1, s, s)
            pulled[index] -= coefficient * (weight * previous[index] - target[0])
        return pulled

    def compose(self, view_latents: torch.Tensor) -> torch.Tensor:
        """The canvas latent (1, C, H, W) of the views' latents ``view_latents`` (N, C, s, s).

        "paper": every canvas pixel takes the value of the last view in ``chain`` that sees it (a projected
        view's value sampled bilinearly at the pixel, as ``CanvasViews.fuse`` samples it); pixels no view
        sees are 0. "average": ``CanvasViews.fuse``.
        """
        if self.compose_mode == "average":
            return self.views.fuse(view_latents)
        canvas = view_latents.new_zeros(1, view_latents.shape[1], self.views.canvas.height, self.views.canvas.width)
        for index in self.chain:
            placed = self._single[index].fuse(view_latents[index : index + 1])
            canvas = torch.where(self._device.on(("footprint", index), self._footprints[index], view_latents), placed, canvas)
        return canvas

    def details(self) -> dict:
        """What a job records about the run: lambda, closed_loop, compose and how many views are conditioned."""
        return {"lambda": self.strength, "closed_loop": self.closed_loop, "compose": self.compose_mode,
                "conditioned_views": len(self._neighbour_views)}


def score_step_gain(scheduler, step_index: int, timestep) -> float:
    """How far one unit of the correlation score at x_t moves this step's x_{t-1}: the official code's gamma_t.

    Schedulers with ``alphas_cumprod`` (DDIM, LCM, DPM-Solver, UniPC, PNDM): gamma_t = sqrt(a_prev / a_t) -
    sqrt((1 - a_prev) / (1 - a_t)), a_t at ``timestep``, a_prev at the next timestep of
    ``scheduler.timesteps`` (after the last: the scheduler's ``final_alpha_cumprod``, else 1, a clean
    sample). Euler-type schedulers (latents x0 + sigma eps, ``init_noise_sigma`` > 1): the same gamma with
    a = 1 / (1 + sigma^2) from ``sigmas[step_index]`` and ``sigmas[step_index + 1]``, times
    sqrt(a_t / a_prev), because their latents are the DDIM latents scaled by 1 / sqrt(a). Raises
    ValueError for a scheduler in neither family.

    Flow-matching samplers (``is_flow_matching``: x_t = (1 − σ) x0 + σ ε, an Euler step being the deterministic DDIM
    step of that path) have the DDIM family's gain in their own coordinates, alpha = 1 − σ, s = σ:
    gamma_t = alpha_prev / alpha_t − s_prev / s_t = (1 − σ_prev) / (1 − σ_t) − σ_prev / σ_t, which is the alphas_cumprod
    gamma above of the same path brought to unit variance (a = alpha² / (alpha² + s²)), times r_prev / r_t with
    r = sqrt(alpha² + s²), as the Euler-type rule is. At σ_t = 1 (pure noise: no signal, alpha_t = 0) the gain has no
    finite value, and 0 is returned: the pull starts at the next step.
    """
    if is_flow_matching(scheduler):
        sigma_now, sigma_next = (float(scheduler.sigmas[i]) for i in (step_index, step_index + 1))
        if sigma_now >= 1.0:
            return 0.0
        return (1.0 - sigma_next) / (1.0 - sigma_now) - sigma_next / sigma_now
    if float(scheduler.init_noise_sigma) > 1.0:
        sigma_now, sigma_next = (float(scheduler.sigmas[i]) for i in (step_index, step_index + 1))
        now, following = 1.0 / (1.0 + sigma_now**2), 1.0 / (1.0 + sigma_next**2)
        scale = math.sqrt(now / following)
    elif hasattr(scheduler, "alphas_cumprod"):
        alphas = scheduler.alphas_cumprod
        now = float(alphas[int(timestep)])
        if step_index + 1 < len(scheduler.timesteps):
            # The timestep the sampler steps to; DDIM with "leading" spacing (SD's) computes the same one.
            following = float(alphas[int(scheduler.timesteps[step_index + 1])])
        else:
            following = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        scale = 1.0
    else:
        raise ValueError(f"SyncSDE needs a scheduler with alphas_cumprod or sigmas, and {type(scheduler).__name__} has neither.")
    gamma = math.sqrt(following / now) - math.sqrt((1.0 - following) / (1.0 - now))
    return gamma * scale


def _time_weight(scheduler, timestep) -> float:
    """t / T: the official code's linear decrease of lambda, T the schedule's largest timestep."""
    return float(timestep) / float(scheduler.timesteps.max())


def _overlaps(footprints: list[torch.Tensor], a: int, b: int) -> int:
    """How many canvas pixels views ``a`` and ``b`` both see."""
    return int((footprints[a] & footprints[b]).sum())


def _crop_chain(views: CanvasViews, footprints, closed_loop: bool) -> tuple[list[int], list[list[int]]]:
    """(the crop windows in chain order, each crop's neighbours): rows by ``top``, left to right in a row."""
    rows: dict[int, list[int]] = {}
    for index, crop in enumerate(views.crops):
        rows.setdefault(crop.top, []).append(index)
    rows = [sorted(rows[top], key=lambda index: views.crops[index].left) for top in sorted(rows)]
    neighbours: list[list[int]] = [[] for _ in views.crops]

    def best(candidates: Sequence[int], index: int) -> list[int]:
        overlap, chosen = max((_overlaps(footprints, index, other), other) for other in candidates)
        return [chosen] if overlap > 0 else []

    canvas = views.canvas
    for row_number, row in enumerate(rows):
        for position, index in enumerate(row):
            if position > 0:
                neighbours[index] += best([row[position - 1]], index)
            elif closed_loop and canvas.wraps_x and len(row) > 1:
                neighbours[index] += best([row[-1]], index)
            if row_number > 0:
                neighbours[index] += best(rows[row_number - 1], index)
            elif closed_loop and canvas.wraps_y and len(rows) > 1:
                neighbours[index] += best(rows[-1], index)
    neighbours = [sorted(set(group)) for group in neighbours]  # two windows per row: left and wrap are one
    return [index for row in rows for index in row], neighbours


def _projected_chain(views: CanvasViews, footprints, crop_order: list[int], closed_loop: bool) -> list[list[int]]:
    """Each projected view's neighbours (module docstring): its ring predecessor, else every earlier view it overlaps."""
    first = len(views.crops)
    rings: dict[float, list[int]] = {}
    for offset, (_, view) in enumerate(views.projected):
        rings.setdefault(round(float(view.pitch), 6), []).append(first + offset)
    neighbours = []
    earlier = list(crop_order)
    for offset, (_, view) in enumerate(views.projected):
        index = first + offset
        ring = rings[round(float(view.pitch), 6)]
        position = ring.index(index)
        if position > 0:
            group = [ring[position - 1]]
        else:
            group = list(earlier)
            if closed_loop and len(ring) > 2:
                group.append(ring[-1])
        neighbours.append(sorted(other for other in set(group) if _overlaps(footprints, index, other) > 0))
        earlier.append(index)
    return neighbours
