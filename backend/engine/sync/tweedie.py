"""Tweedie's estimate x0 and back: the scheduler arithmetic that fusion of clean latents needs.

Fusing predicted clean latents (SyncTweedies, Kim et al. 2024) averages each view's x0 on the canvas,
reads the average back into every view, and steps each view from its *own* x_t with the model output
that predicts exactly that x0. ``predicted_clean_latent`` is the first conversion (SyncDiffusion uses
it too) and ``prediction_for_clean_latent`` its inverse; both follow the scheduler's own formulas, so
any diffusers scheduler in the families below steps as if the model had predicted the fused x0.

Flow-matching samplers (``engine/flow_matching.py``: x_t = (1 − σ) x0 + σ ε, the model predicting the velocity
v = ε − x0) have x0 = x_t − σ v and v = (x_t − x0) / σ, σ at the sampler's current ``step_index``.
"""

from __future__ import annotations

import torch


def predicted_clean_latent(scheduler, latents: torch.Tensor, prediction: torch.Tensor, timestep) -> torch.Tensor:
    """Tweedie's estimate x0 from x_t and the model's prediction, as the scheduler's own ``step`` computes
    its ``pred_original_sample``. Shapes (N, C, h, w); differentiable.

    Consistency models (``LCMScheduler``) return the scheduler's ``denoised`` output, c_skip x_t + c_out x0,
    which is what their step moves to. Otherwise two families: schedulers whose latents are
    x_t = sqrt(a) x0 + sqrt(1 - a) eps (DDIM, PNDM, DPM-Solver, UniPC; ``alphas_cumprod``) and
    k-diffusion-style ones whose latents are x0 + sigma eps (Euler, LMS;
    ``init_noise_sigma`` > 1, sigma at the scheduler's current ``step_index``, set by
    ``scale_model_input``). Flow-matching samplers (their ``prediction`` a velocity): x_t − σ v.
    """
    if is_flow_matching(scheduler):
        return latents - _current_sigma(scheduler, latents) * prediction
    if hasattr(scheduler, "get_scalings_for_boundary_condition_discrete"):
        # A consistency model's estimate is its boundary-condition output: c_skip x_t + c_out x0.
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        return c_out * _alpha_family_clean(scheduler, latents, prediction, timestep) + c_skip * latents
    kind = scheduler.config.prediction_type
    if float(scheduler.init_noise_sigma) > 1.0:
        sigma = scheduler.sigmas[scheduler.step_index].to(latents.device, latents.dtype)
        if kind == "epsilon":
            return latents - sigma * prediction
        if kind == "v_prediction":
            return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)
        return prediction  # "sample"
    return _alpha_family_clean(scheduler, latents, prediction, timestep)


def _alpha_family_clean(scheduler, latents: torch.Tensor, prediction: torch.Tensor, timestep) -> torch.Tensor:
    """x0 for latents x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = ``alphas_cumprod[timestep]``."""
    kind = scheduler.config.prediction_type
    alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(latents.device, latents.dtype)
    if kind == "epsilon":
        return (latents - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if kind == "v_prediction":
        return alpha_bar.sqrt() * latents - (1 - alpha_bar).sqrt() * prediction
    return prediction  # "sample"


def prediction_for_clean_latent(scheduler, latents: torch.Tensor, clean: torch.Tensor, timestep) -> torch.Tensor:
    """The model output (noise, velocity or sample, per the scheduler's ``prediction_type``) for which the
    scheduler's x0 at ``latents`` is ``clean``: the inverse of ``predicted_clean_latent``. Shapes (N, C, h, w).

    Call it where ``predicted_clean_latent`` may be called (after ``scale_model_input`` at this step).
    """
    if is_flow_matching(scheduler):
        return (latents - clean) / _current_sigma(scheduler, latents)
    if hasattr(scheduler, "get_scalings_for_boundary_condition_discrete"):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        clean = (clean - c_skip * latents) / c_out  # the x0 inside the consistency model's boundary condition
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return clean
    if float(scheduler.init_noise_sigma) > 1.0:
        sigma = scheduler.sigmas[scheduler.step_index].to(latents.device, latents.dtype)
        if kind == "epsilon":
            return (latents - clean) / sigma
        # v_prediction: x0 = v * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
        return (latents / (sigma**2 + 1) - clean) * (sigma**2 + 1) ** 0.5 / sigma
    alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(latents.device, latents.dtype)
    if kind == "epsilon":
        return (latents - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
    return (alpha_bar.sqrt() * latents - clean) / (1 - alpha_bar).sqrt()  # v_prediction


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` (a diffusers scheduler, or its config as a dict) is a flow-matching sampler
    (``FlowMatchEulerDiscreteScheduler`` or a subclass, such as ``engine.flow_matching.FlowMatchingSampler``): its
    latents are (1 − σ) x0 + σ ε and its model predicts the velocity ε − x0. By class name: no diffusers import."""
    if isinstance(scheduler, dict):
        return str(scheduler.get("_class_name", "")).startswith("FlowMatch")
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def _current_sigma(scheduler, latents: torch.Tensor) -> torch.Tensor:
    """σ of the step a sampler is at (its ``step_index``, set by ``scale_model_input``), on ``latents``' device and dtype."""
    return scheduler.sigmas[scheduler.step_index].to(latents.device, latents.dtype)
