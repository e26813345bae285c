"""THE denoising loop, top to bottom.

Every step: read each view's window of the canvas latent, predict with the denoiser (views in batches),
step each batch's own scheduler copy, and fuse the views back into the canvas. The synchronisation
strategies are the small pieces it calls (``backend/sync/``). The loop reports each step through one
callback, which can also stop the job, so the loop never knows whether a terminal or Blender watches.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from .canvas import Canvas, CropView
from .errors import JobCancelled
from .sync import multidiffusion
from .sync.syncdiffusion import SyncDiffusionGuidance

# report(stage, step, total, preview_latent) -> True to stop the job before the next step.
StepReport = Callable[[str, int, int, Optional[torch.Tensor]], Optional[bool]]


def sample_canvas(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    canvas: Canvas,
    views: list[CropView],
    initial_noise: torch.Tensor,
    num_steps: int,
    view_batch: int,
    report: StepReport | None = None,
    step_kwargs: dict | None = None,
    guidance: SyncDiffusionGuidance | None = None,
) -> torch.Tensor:
    """Denoise a canvas latent with MultiDiffusion over ``views`` (and SyncDiffusion when ``guidance``).

    denoiser: (N, C, h, w) latents, timestep -> (N, C, h, w) guided prediction (``backend/denoiser.py``).
    scheduler: any diffusers scheduler with ``set_timesteps``/``scale_model_input``/``step``; it is copied
        once per batch of views so multistep schedulers keep each batch's own history.
    initial_noise: (1, C, H, W) unit Gaussian noise on the canvas (scaled here by init_noise_sigma).
    step_kwargs: extra arguments of ``scheduler.step`` (a generator for stochastic samplers).
    guidance: SyncDiffusion's pull towards the anchor view before the steps it guides (None: MultiDiffusion);
        it reads the state of the first batch's scheduler copy, which is at the current step like the others.
    Returns the denoised canvas latent (1, C, H, W). Raises JobCancelled when ``report`` returns True.
    """
    step_kwargs = step_kwargs or {}
    scheduler.set_timesteps(num_steps, device=initial_noise.device)
    latents = initial_noise * scheduler.init_noise_sigma
    batch_schedulers = [copy.deepcopy(scheduler) for _ in range(0, len(views), view_batch)]
    coverage = canvas.coverage(views, latents)

    for step_index, timestep in enumerate(scheduler.timesteps):
        view_latents = canvas.read(latents, views)
        predictions = None  # SyncDiffusion's fast path hands back the predictions of its gradient pass
        if guidance is not None:
            view_latents, predictions = guidance.guide(view_latents, timestep, batch_schedulers[0], step_index)
        denoised_views = []
        for start, batch_scheduler in zip(range(0, len(views), view_batch), batch_schedulers):
            batch_latents = view_latents[start : start + view_batch]
            if predictions is None:
                prediction = denoiser(batch_scheduler.scale_model_input(batch_latents, timestep), timestep)
            else:
                prediction = predictions[start : start + view_batch]
            denoised_views.append(batch_scheduler.step(prediction, timestep, batch_latents, **step_kwargs).prev_sample)
        latents = multidiffusion.fuse_views(canvas, views, torch.cat(denoised_views), coverage)

        if report is not None and report("denoising", step_index + 1, num_steps, latents):
            raise JobCancelled(f"The job was cancelled after step {step_index + 1} of {num_steps}.")
    return latents
