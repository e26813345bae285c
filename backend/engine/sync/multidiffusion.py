"""MultiDiffusion (Bar-Tal et al., 2023): make the views one image by averaging them where they overlap.

Two rules for *what* is averaged (``--fusion``; docs/engine.md, "Fusion"):

- ``fuse_noisy``: each view's x_{t-1} after its own scheduler step, the paper's rule and diffusers'
  ``StableDiffusionPanoramaPipeline``'s. The next step reads every view from the averaged canvas. Exact
  for crop windows; for projected views the bilinear read mixes neighbouring noise samples, which
  shrinks the noise's variance (docs/engine.md has the numbers).
- ``fuse_clean``: Tweedie's x0 of every view (SyncTweedies, Kim et al. 2024). Each view keeps its own
  x_t (its own noise) from step to step; the views' x0 are averaged on the canvas and read back, and
  each view steps from its own x_t with the model output that predicts the averaged x0. Only clean,
  noise-free content is ever resampled.
"""

from __future__ import annotations

import torch

from ...sphere.view_sets import CanvasViews
from .tweedie import predicted_clean_latent, prediction_for_clean_latent


def fuse_noisy(views: CanvasViews, stepped_latents: torch.Tensor) -> torch.Tensor:
    """The canvas latent x_{t-1} (1, C, H, W): the average of the views' stepped latents (len(views), C, s, s)."""
    return views.fuse(stepped_latents)


def fuse_clean(views: CanvasViews, scheduler, view_latents: torch.Tensor, predictions: torch.Tensor, timestep,
               known=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Synchronise the views' predictions through their averaged clean latents.

    scheduler: a scheduler copy at this step (``scale_model_input`` called): x0 and its inverse read only
        the step's noise level, which every view shares.
    view_latents, predictions: (len(views), C, s, s), each view's x_t and the model's prediction there.
    known: None, or a ``sampler.KnownRegion`` whose latent the averaged x0 keeps (``--photo``).
    Returns (the predictions that make each view's x0 its reading of the averaged x0, same shape; the
    averaged x0 on the canvas (1, C, H, W), which is also the step's preview).
    """
    fused_clean = views.fuse(predicted_clean_latent(scheduler, view_latents, predictions, timestep))
    if known is not None:
        fused_clean = known.keep(fused_clean)
    synced = views.read(fused_clean)
    return prediction_for_clean_latent(scheduler, view_latents, synced, timestep), fused_clean


def step_canvas(views: CanvasViews, canvas_scheduler, projected_scheduler, latents: torch.Tensor,
                projected_latents: torch.Tensor | None, view_latents: torch.Tensor, predictions: torch.Tensor, timestep,
                step_kwargs: dict, known=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One step of canvas fusion: the canvas is the state, stepped once with the views' fused clean latent.

    The views' x0 (Tweedie) are averaged on the canvas; the canvas steps from its own x_t with the model output
    that predicts that average, and the projected views (which keep their own x_t, as in ``fuse_clean``) step
    from theirs with the output that predicts their reading of it. Crop windows own no state, so they may move
    from step to step (the shifted schedule); where they meet only each other this equals ``fuse_noisy``'s
    average for any first-order sampler, and a multistep sampler keeps one history, the canvas's.

    canvas_scheduler, projected_scheduler: two copies of the sampler at this step (one history each).
    latents: the canvas x_t (1, C, H, W); projected_latents: the projected views' x_t (P, C, s, s) or None;
    view_latents, predictions: (len(views), C, s, s), crops first, the x_t each view was predicted at.
    known: None, or a ``sampler.KnownRegion`` whose latent the fused x0 keeps (``--photo``).
    Returns (the canvas x_{t-1}, the projected views' x_{t-1} or None, the fused clean latent x0 on the canvas
    (1, C, H, W): the step's preview).
    """
    fused_clean = views.fuse(predicted_clean_latent(canvas_scheduler, view_latents, predictions, timestep))
    if known is not None:
        fused_clean = known.keep(fused_clean)
    canvas_prediction = prediction_for_clean_latent(canvas_scheduler, latents, fused_clean, timestep)
    if projected_latents is not None:
        own = prediction_for_clean_latent(projected_scheduler, projected_latents, views.read_projected(fused_clean), timestep)
        projected_latents = projected_scheduler.step(own, timestep, projected_latents, **step_kwargs).prev_sample
    latents = canvas_scheduler.step(canvas_prediction, timestep, latents, **step_kwargs).prev_sample
    return latents, projected_latents, fused_clean
