"""The one interface through which the denoising loop talks to the model.

A denoiser takes a batch of view latents (N, C, h, w) and a timestep and returns the model's prediction
for each view (noise or velocity, whatever the scheduler expects), classifier-free guidance included.
The synchronisation strategies only see latents and predictions, so they work with any backbone that
implements this call.
"""

from __future__ import annotations

import torch


class GuidedUNetDenoiser:
    """A Stable Diffusion UNet with classifier-free guidance, as diffusers' pipelines apply it.

    prompt_embeds, negative_embeds: (1, L, D) text encoder outputs for the prompt and negative prompt.
    guidance_scale: w in ``uncond + w * (cond - uncond)``; at w <= 1 the unconditional pass is skipped
    (diffusers' rule), so the call costs one UNet evaluation per view instead of two.
    """

    def __init__(self, unet, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float):
        self.unet = unet
        self.guidance_scale = guidance_scale
        self.uses_guidance = guidance_scale > 1.0
        # Interleaved (uncond, cond) pairs per view, the order diffusers' panorama pipeline uses.
        self.embeds_per_view = torch.cat([negative_embeds, prompt_embeds]) if self.uses_guidance else prompt_embeds

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Prediction for each view: latents (N, C, h, w) -> (N, C, h, w), same dtype, without autograd."""
        return self.predict(latents, timestep)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """As calling the denoiser, but differentiable when autograd is on (SyncDiffusion's gradient)."""
        count = latents.shape[0]
        model_input = latents.repeat_interleave(2, dim=0) if self.uses_guidance else latents
        embeds = self.embeds_per_view.repeat(count, 1, 1)
        prediction = self.unet(model_input, timestep, encoder_hidden_states=embeds).sample
        if not self.uses_guidance:
            return prediction
        uncond, cond = prediction[::2], prediction[1::2]
        return uncond + self.guidance_scale * (cond - uncond)
