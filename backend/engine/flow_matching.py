"""Flow matching (Stable Diffusion 3): its sampler in the denoising loop's interface.

Flow-matching models are trained on the straight path between an image and noise, in diffusers' convention
x_t = (1 − σ) x0 + σ ε, and predict the velocity v = ε − x0 along it; the sampler integrates dx/dσ = v from
σ = 1 (pure noise) to 0 with Euler steps, over the σ schedule of ``FlowMatchEulerDiscreteScheduler`` (its
``shift``, or its resolution-dependent shift ``mu``). Tweedie's estimate is then exact arithmetic,
x0 = x_t − σ v, and its inverse v = (x_t − x0) / σ (``sync/tweedie.py``), so MultiDiffusion, SyncDiffusion and
clean fusion work on flow-matching models unchanged.

``FlowMatchingSampler`` is diffusers' scheduler with the two things the loop asks of every sampler that it
lacks: ``init_noise_sigma`` (1: the path starts at unit noise) and ``scale_model_input`` (the identity, which
also fixes the step's σ, as k-diffusion samplers do, so that x0 can be read before the step).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class FlowMatchingSampler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` (same config, σ schedule and steps) in the loop's sampler interface.

    view_tokens: the transformer's tokens per view ((window / patch size)²), from which a config with
    ``use_dynamic_shifting`` takes its shift ``mu`` as diffusers' SD3 pipeline does for an image of that size
    (``calculate_shift``); unused otherwise. ``make_flow_matching_sampler`` sets it.
    """

    init_noise_sigma = 1.0
    view_tokens: int | None = None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model's input at ``timestep``: ``sample`` itself (flow-matching models take x_t unscaled). Fixes the
        step index on the first call, so ``sigmas[step_index]`` is this step's σ before ``step`` runs."""
        if self.step_index is None:
            self._init_step_index(timestep)
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − σ) x0 + σ noise at ``timesteps`` (``scale_noise``), under the name img2img's start calls
        (``sampler.noised_start``); same shape as ``original_samples``."""
        return self.scale_noise(original_samples, timesteps, noise)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """As diffusers' ``set_timesteps``; with ``use_dynamic_shifting`` and no ``mu``, the shift of a
        ``view_tokens`` image (ValueError, diffusers' own, when that is unknown)."""
        if self.config.use_dynamic_shifting and mu is None and self.view_tokens is not None:
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            mu = calculate_shift(self.view_tokens, self.config.get("base_image_seq_len", 256),
                                 self.config.get("max_image_seq_len", 4096), self.config.get("base_shift", 0.5),
                                 self.config.get("max_shift", 1.16))
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def make_flow_matching_sampler(config, view_tokens: int) -> FlowMatchingSampler:
    """The ``FlowMatchingSampler`` of a model's scheduler ``config`` (a flow-matching one) for views of
    ``view_tokens`` transformer tokens each."""
    sampler = FlowMatchingSampler.from_config(config)
    sampler.view_tokens = view_tokens
    return sampler
