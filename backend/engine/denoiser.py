"""The one interface through which the denoising loop talks to the model.

A denoiser takes a batch of view latents (N, C, h, w) and a timestep and returns the model's prediction
for each view (noise or velocity, whatever the scheduler expects), classifier-free guidance included.
The synchronisation strategies only see latents and predictions, so they work with any backbone that
implements this call.
"""

from __future__ import annotations

from typing import Sequence

import torch


class GuidedUNetDenoiser:
    """A Stable Diffusion UNet with classifier-free guidance, as diffusers' pipelines apply it.

    prompt_embeds: (P, L, D) text encoder outputs, one row per distinct prompt (row 0: the main prompt;
    more rows when views have their own prompts, e.g. ``--prompt-up``). negative_embeds: (1, L, D) for
    the negative prompt, shared by every view. view_prompts: the prompt row of every view (None: row 0
    for all). guidance_scale: w in ``uncond + w * (cond - uncond)``; at w <= 1 the unconditional pass is
    skipped (diffusers' rule), so the call costs one UNet evaluation per view instead of two. A UNet with
    ``time_cond_proj_dim`` (a guidance-distilled Latent Consistency Model) takes w as an embedding instead,
    as diffusers' ``LatentConsistencyModelPipeline`` gives it, and runs no unconditional pass.
    """

    def __init__(self, unet, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float,
                 view_prompts: list[int] | None = None):
        self.unet = unet
        self.guidance_scale = guidance_scale
        self.guidance_embedding = None
        if getattr(unet.config, "time_cond_proj_dim", None):
            self.guidance_embedding = guidance_scale_embedding(guidance_scale, unet.config.time_cond_proj_dim).to(
                prompt_embeds.device, prompt_embeds.dtype)
            guidance_scale = 1.0  # the embedding carries it
        self.uses_guidance = guidance_scale > 1.0
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.view_prompts = view_prompts
        self._batch_embeds = {}  # prompt rows of a batch -> its encoder states; the loop's batches repeat every step
        self.unet_rows = 0  # rows the UNet has run (a view counts twice with classifier-free guidance): the work done

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, views: Sequence[int] | None = None) -> torch.Tensor:
        """Prediction for each view: latents (N, C, h, w) of the views numbered ``views`` (None: N views of the
        main prompt) -> (N, C, h, w), same dtype, without autograd."""
        return self.predict(latents, timestep, views)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, views: Sequence[int] | None = None) -> torch.Tensor:
        """As calling the denoiser, but differentiable when autograd is on (SyncDiffusion's gradient)."""
        count = latents.shape[0]
        if views is None or self.view_prompts is None:
            rows = [0] * count
        else:
            rows = [self.view_prompts[view] for view in views]
        embeds = self._batch_embeds.get(tuple(rows))
        if embeds is None:
            embeds = self.prompt_embeds[rows]
            if self.uses_guidance:
                # Interleaved (uncond, cond) pairs per view, the order diffusers' panorama pipeline uses.
                negative = self.negative_embeds.expand(count, -1, -1)
                embeds = torch.stack([negative, embeds], dim=1).flatten(0, 1)
            self._batch_embeds[tuple(rows)] = embeds
        model_input = latents.repeat_interleave(2, dim=0) if self.uses_guidance else latents
        condition = None if self.guidance_embedding is None else self.guidance_embedding.expand(model_input.shape[0], -1)
        prediction = self.unet(model_input, timestep, encoder_hidden_states=embeds, timestep_cond=condition).sample
        self.unet_rows += model_input.shape[0]
        if not self.uses_guidance:
            return prediction
        uncond, cond = prediction[::2], prediction[1::2]
        return uncond + self.guidance_scale * (cond - uncond)


def guidance_scale_embedding(guidance_scale: float, dim: int) -> torch.Tensor:
    """The (1, dim) float32 sinusoidal embedding of w − 1 (scaled by 1000) that guidance-distilled LCM UNets take
    as ``timestep_cond``: the formula of diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``."""
    w = torch.tensor([(guidance_scale - 1.0) * 1000.0])
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding
