"""THE denoising loop, top to bottom.

Every step: take each view's latent (read from the canvas, or the view's own state when clean latents
are fused), let SyncDiffusion guide them, predict with the denoiser (views in batches), synchronise,
step each batch's own scheduler copy, and fuse. The synchronisation strategies are the small pieces it
calls (``backend/engine/sync/``). The loop reports each step through one callback, which can also stop the
job, so the loop never knows whether a terminal or Blender watches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import JobCancelled
from .sync import multidiffusion
from .sync.tweedie import predicted_clean_latent
from .sync.syncdiffusion import SyncDiffusionGuidance
from ..sphere.schedules import ViewSchedule
from ..sphere.view_sets import CanvasViews

# report(stage, step, total, preview) -> True to stop the job before the next step. From the loop, ``preview`` is
# the canvas's predicted clean latent on the steps ``preview_steps`` picks, else None; the job runner turns it
# into a PNG and hands its callers the file's path instead (``app/job.py``).
StepReport = Callable[[str, int, int, Optional[torch.Tensor]], Optional[bool]]

FUSIONS = ("noisy", "clean", "own", "canvas")
"""What ``Synchronisation.fusion`` may be (``request.GenerateRequest.resolved_fusion`` decides it)."""


@dataclass(frozen=True)
class Synchronisation:
    """How the loop makes its views one image: what is fused on the canvas, and the strategies that act.

    fusion: "noisy" averages the views' x_{t-1} on the canvas every step (MultiDiffusion); "clean" averages
        their x0 and lets each view keep its own x_t (``sync/multidiffusion.py``, SyncTweedies); "own": each
        view keeps its own x_t and nothing is averaged: ``synchroniser`` ties them (it is required then, and
        only then); "canvas": the canvas is the state, stepped once with the views' averaged x0, and crop
        windows own nothing (``multidiffusion.step_canvas``): what a schedule that moves its windows needs.
    guidance: SyncDiffusion (``sync/syncdiffusion.py``): the pull towards the anchor views before the steps it
        guides; works with every fusion.
    synchroniser: SyncSDE (``sync/syncsde.py``): after every step ``synchronise(previous, stepped, predictions,
        timestep, step_index, scheduler)`` returns the views' new x_{t-1} and ``compose(view_latents)`` the canvas.
    merged_attention: MAD (``sync/mad.py``): ``begin_step(step_index)`` first thing every step; while
        ``active`` the denoiser sees every view in one batch, so merged attention merges them all.

    Raises ValueError for a combination that cannot run (an unknown fusion, "own" without a synchroniser, a
    synchroniser with another fusion).
    """

    fusion: str = "noisy"
    guidance: SyncDiffusionGuidance | None = None
    synchroniser: object | None = None
    merged_attention: object | None = None
    follow_views: Callable[[int, CanvasViews], None] | None = None
    """With a ``ViewSchedule``: called with (step index, the step's views) before the step, so that whatever
    numbers views (each view's prompt, SyncDiffusion's anchors, MAD's merge) follows the windows."""

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}.")
        if (self.fusion == "own") != (self.synchroniser is not None):
            raise ValueError('Fusion "own" (views keep their own states) needs a synchroniser, and a synchroniser '
                             'needs fusion "own".')


def sample_canvas(
    denoiser: Callable,
    scheduler,
    views: CanvasViews | ViewSchedule,
    initial_noise: torch.Tensor,
    *,
    steps: int,
    view_batch: int,
    sync: Synchronisation = Synchronisation(),
    projected_noise: torch.Tensor | None = None,
    step_kwargs: dict | None = None,
    report: StepReport | None = None,
    preview_every: int = 0,
    start: "ImageStart | None" = None,
    known: "KnownRegion | None" = None,
) -> torch.Tensor:
    """Denoise a canvas latent over ``views`` in ``steps`` steps, synchronised as ``sync`` says.

    denoiser: (N, C, s, s) latents, timestep, the N views' indices -> (N, C, s, s) guided prediction
        (``backend/engine/denoiser.py``).
    scheduler: any diffusers scheduler with ``set_timesteps``/``scale_model_input``/``step``; it is copied
        once per batch of views so multistep schedulers keep each batch's own history.
    views: the canvas and its views, the same every step; or a ``ViewSchedule`` (the shifted schedule), whose
        views of each step the loop takes (fusion "canvas" only).
    initial_noise: (1, C, H, W) unit Gaussian noise on the canvas (scaled here by init_noise_sigma). With
        fusion "clean" and "own", crop windows start from their window of ``initial_noise``; with those and
        "canvas", projected views start from ``projected_noise`` (len(views.projected), C, s, s), unit
        Gaussian noise of their own.
    view_batch: views per denoiser call (every view while MAD is active).
    step_kwargs: extra arguments of ``scheduler.step`` (a generator for stochastic samplers).
    report: called after every step with ("denoising", step, steps, preview); True stops the job. ``preview``
        is the canvas's predicted clean latent x0 (1, C, H, W), the views' Tweedie estimates fused as the
        fusion fuses them (composed by SyncSDE's rule with fusion "own"), on the steps ``preview_steps``
        picks with ``preview_every`` (the last step's is the final latent for DDIM), else None. It costs one
        fusion of the views' x0 on those steps only (fusions "clean" and "canvas" make it anyway).
    start: img2img (``ImageStart``): the loop skips the steps the strength leaves out (``first_step``) and starts
        from the image's latent noised to the first step it runs (``noised_start``); ``report`` then counts the
        steps it runs. None: from ``initial_noise`` at the first step.
    known: a region of the canvas whose clean latent is given (``KnownRegion``, ``--photo``): every step the fused
        clean latent x0 keeps it before the views and the canvas step with it (fusions "clean" and "canvas", which
        fuse x0), and the returned latent holds it exactly.
    Returns the denoised canvas latent (1, C, H, W). Raises JobCancelled when ``report`` returns True, and
    ValueError for fewer than one step or view per batch, a schedule without fusion "canvas", or a known region
    with a fusion that fuses no clean latent.
    """
    if steps < 1 or view_batch < 1:
        raise ValueError(f"The loop needs at least one step and one view per batch, not {steps} and {view_batch}.")
    fusion, guidance, synchroniser, merged_attention = sync.fusion, sync.guidance, sync.synchroniser, sync.merged_attention
    schedule = views if isinstance(views, ViewSchedule) else None
    if schedule is not None and (fusion != "canvas" or len(schedule) != steps):
        raise ValueError("A view schedule needs fusion \"canvas\" and one offset per step.")
    if known is not None and fusion not in ("clean", "canvas"):
        raise ValueError(f"A known region is kept in the fused clean latent, which fusion {fusion!r} does not make.")
    step_kwargs = step_kwargs or {}
    scheduler.set_timesteps(steps, device=initial_noise.device)
    first = begin_at(scheduler, steps, start)  # 0 unless img2img skips the first steps
    views = schedule.views_at(first) if schedule is not None else views
    latents = noised_start(scheduler, initial_noise, start.latent if start else None, first)
    if fusion in ("canvas", "clean", "own"):  # each view's own starting x_t (the canvas's, read, for crop windows)
        own_latents = noised_start(scheduler, _own_view_noise(views, initial_noise, projected_noise),
                                   views.read(start.latent) if start else None, first)
    if fusion == "canvas":
        # One history for the canvas and one for the projected views, which keep their own x_t (as with "clean").
        canvas_scheduler, projected_scheduler = copy.deepcopy(scheduler), copy.deepcopy(scheduler)
        batches, batch_schedulers = _canvas_batches(views, canvas_scheduler, projected_scheduler), [canvas_scheduler]
        projected_latents = own_latents[len(views.crops):] if views.projected else None
    else:
        starts = range(0, len(views), view_batch)
        batch_schedulers = [copy.deepcopy(scheduler) for _ in starts]
        batches = [(slice(start, start + view_batch), batch_scheduler) for start, batch_scheduler in zip(starts, batch_schedulers)]
    if fusion in ("clean", "own"):
        view_latents = own_latents

    runs = steps - first  # the steps this loop runs, as ``report`` counts them
    previewed = {first + step for step in preview_steps(runs, preview_every)}
    for step_index, timestep in enumerate(scheduler.timesteps[first:], start=first):
        if schedule is not None:  # the windows move: this step's views, and whatever numbers views follows them
            views = schedule.views_at(step_index)
            batches = _canvas_batches(views, canvas_scheduler, projected_scheduler)
            if sync.follow_views is not None:
                sync.follow_views(step_index, views)
        if merged_attention is not None:
            merged_attention.begin_step(step_index)
        if fusion == "noisy":
            view_latents = views.read(latents)
        if fusion == "canvas":  # crop windows read the canvas; projected views bring their own x_t
            view_latents = torch.cat([views.canvas.read(latents, views.crops)] + ([projected_latents] if views.projected else []))
        wants_preview = report is not None and step_index + 1 in previewed
        preview = None
        predictions = None  # SyncDiffusion's fast path hands back the predictions of its gradient pass
        if guidance is not None:
            view_latents, predictions = guidance.guide(view_latents, timestep, batch_schedulers[0], step_index)
            if fusion == "canvas":  # the guided windows move the canvas itself (projected views are their own anchors)
                latents = views.put_crops(latents, view_latents[: len(views.crops)])
        if predictions is None:
            model_inputs = torch.cat([batch_scheduler.scale_model_input(view_latents[part], timestep) for part, batch_scheduler in batches])
            chunk = len(views) if merged_attention is not None and merged_attention.active else view_batch
            predictions = torch.cat([
                denoiser(model_inputs[start : start + chunk], timestep, range(start, min(start + chunk, len(views))))
                for start in range(0, len(views), chunk)
            ])
        if fusion == "canvas":
            latents, projected_latents, fused_clean = multidiffusion.step_canvas(
                views, canvas_scheduler, projected_scheduler, latents, projected_latents, view_latents, predictions,
                timestep, step_kwargs, known)
            preview = fused_clean if wants_preview else None
        else:
            if fusion == "clean":
                predictions, latents = multidiffusion.fuse_clean(views, batch_schedulers[0], view_latents, predictions, timestep,
                                                                 known)
                preview = latents if wants_preview else None
            elif wants_preview:  # before the step: a sigma sampler's x0 reads the step's own sigma
                clean = predicted_clean_latent(batch_schedulers[0], view_latents, predictions, timestep)
                preview = synchroniser.compose(clean) if synchroniser is not None else views.fuse(clean)
            previous = view_latents
            view_latents = torch.cat([
                batch_scheduler.step(predictions[part], timestep, view_latents[part], **step_kwargs).prev_sample
                for part, batch_scheduler in batches
            ])
            if synchroniser is not None:
                view_latents = synchroniser.synchronise(previous, view_latents, predictions, timestep, step_index, batch_schedulers[0])
                latents = synchroniser.compose(view_latents)
            elif fusion == "noisy":
                latents = multidiffusion.fuse_noisy(views, view_latents)

        if report is not None and report("denoising", step_index + 1 - first, runs, preview):
            raise JobCancelled(f"The job was cancelled after step {step_index + 1 - first} of {runs}.")
    if fusion == "clean":
        latents = multidiffusion.fuse_noisy(views, view_latents)  # each view's final latent, averaged once
    if known is not None:
        # Exactly the known latent: a sampler whose last step keeps a little noise (DDIM with SD's final alpha
        # below 1), and the views' resampled average under "clean", leave it close but not equal.
        latents = known.keep(latents)
    return latents


@dataclass(frozen=True)
class ImageStart:
    """Where img2img starts: the image's canvas latent and how much of the schedule re-draws it.

    latent: (1, C, H, W) the clean canvas latent of the start image, scaled by the VAE's scaling factor
        (``decode.encode_canvas``), on the device and in the dtype of the loop's noise.
    strength: in (0, 1]: the fraction of the ``steps`` steps that runs (1: the image's latent at the first
        timestep, where almost nothing of it is left; small: a light touch).
    """

    latent: torch.Tensor
    strength: float


@dataclass(frozen=True)
class KnownRegion:
    """A region of the canvas whose clean latent is known (``--photo``: ``photo_region.known_region``), kept while
    the rest is painted around it: the x0 form of RePaint, so it works with every sampler.

    latent: (1, C, H, W) the known clean canvas latent (scaled as ``ImageStart.latent``), valid where ``mask`` is 1.
    mask: (1, 1, H, W) in [0, 1], 1 where the latent is known; both on the device and in the dtype of the loop.
    """

    latent: torch.Tensor
    mask: torch.Tensor

    def keep(self, clean: torch.Tensor) -> torch.Tensor:
        """``clean`` (1, C, H, W) with the known latent where ``mask`` is 1: mask · latent + (1 − mask) · clean."""
        return torch.lerp(clean, self.latent.to(clean.dtype), self.mask.to(clean.dtype))


def first_step(steps: int, strength: float) -> int:
    """The index of the first of ``steps`` timesteps that img2img at ``strength`` runs, as diffusers'
    ``StableDiffusionImg2ImgPipeline.get_timesteps``: the last ``int(steps * strength)`` steps run.
    ``steps - first_step`` may be 0 (request validation refuses that)."""
    return max(steps - min(int(steps * strength), steps), 0)


def begin_at(scheduler, steps: int, start: ImageStart | None) -> int:
    """The loop's first step index for ``start`` (0 without one), after ``scheduler.set_timesteps(steps)``;
    tells a scheduler that tracks its step index where it begins (``set_begin_index``, as diffusers'
    img2img does), so ``step`` and ``add_noise`` read that step's sigma."""
    if start is None:
        return 0
    first = first_step(steps, start.strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    return first


def noised_start(scheduler, noise: torch.Tensor, clean: torch.Tensor | None, first: int) -> torch.Tensor:
    """The x_t the loop starts from at step ``first``: pure ``noise`` (N, C, h, w) scaled by the sampler's
    ``init_noise_sigma`` without a start image (``clean`` None), else ``clean`` (the same shape, or broadcast
    from (1, C, h, w)) noised to that step's timestep with ``noise`` (``scheduler.add_noise``, as img2img)."""
    if clean is None:
        return noise * scheduler.init_noise_sigma
    timestep = scheduler.timesteps[first : first + 1]
    return scheduler.add_noise(clean.to(noise.dtype).expand_as(noise), noise, timestep)


def preview_steps(steps: int, every: int) -> tuple[int, ...]:
    """The steps (1-based, of ``steps``) whose report carries a preview latent with ``--preview-every`` ``every``:
    every ``every``-th step and the last (the finished canvas, shown while it decodes); none for 0."""
    if every <= 0:
        return ()
    return (*range(every, steps, every), steps)


def _canvas_batches(views: CanvasViews, canvas_scheduler, projected_scheduler) -> list:
    """Canvas fusion's (views, scheduler copy) pairs: the crop windows scale their inputs with the canvas's
    sampler, the projected views with their own (a sigma-based sampler tracks its step in each copy)."""
    crops = len(views.crops)
    return [(slice(0, crops), canvas_scheduler)] + ([(slice(crops, None), projected_scheduler)] if views.projected else [])


def _own_view_noise(views: CanvasViews, canvas_noise: torch.Tensor, projected_noise: torch.Tensor | None) -> torch.Tensor:
    """Each view's own starting noise (len(views), C, s, s): crop windows read theirs exactly from the canvas
    noise (no resampling, so overlapping windows agree), projected views bring their own."""
    parts = [views.canvas.read(canvas_noise, views.crops)] if views.crops else []
    if views.projected:
        if projected_noise is None or projected_noise.shape[0] != len(views.projected):
            raise ValueError("Clean-latent fusion needs one noise latent per projected view.")
        parts.append(projected_noise)
    return torch.cat(parts)
