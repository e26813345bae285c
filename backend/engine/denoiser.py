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
        self._batch_conditioning = {}  # a batch's prompt rows -> its UNet conditioning; batches repeat every step
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
        conditioning = self._batch_conditioning.get(tuple(rows))
        if conditioning is None:
            conditioning = self._batch_conditioning[tuple(rows)] = self.conditioning(rows)
        model_input = latents.repeat_interleave(2, dim=0) if self.uses_guidance else latents
        prediction = self.run_model(model_input, timestep, conditioning)
        self.unet_rows += model_input.shape[0]
        if not self.uses_guidance:
            return prediction
        uncond, cond = prediction[::2], prediction[1::2]
        return uncond + self.guidance_scale * (cond - uncond)

    def run_model(self, model_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """One call of the model on ``model_input`` (B, C, h, w) (both guidance rows of each view) with the batch's
        ``conditioning``: (B, C, h, w). The UNet takes the guidance embedding of an LCM as ``timestep_cond``."""
        condition = None if self.guidance_embedding is None else self.guidance_embedding.expand(model_input.shape[0], -1)
        return self.unet(model_input, timestep, timestep_cond=condition, **conditioning).sample

    def conditioning(self, rows: list[int]) -> dict:
        """The UNet's keyword arguments for a batch of views whose prompt rows are ``rows``: its
        ``encoder_hidden_states``, (2N, L, D) with guidance, else (N, L, D). Subclasses add what their UNet takes."""
        return {"encoder_hidden_states": self.guided_rows(self.prompt_embeds, self.negative_embeds, rows)}

    def guided_rows(self, conditional: torch.Tensor, negative: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
        """One batch's rows of a per-prompt conditioning tensor: ``conditional`` (P, ...) indexed by ``rows``
        (N of them) and, with classifier-free guidance, interleaved with ``negative`` (1, ...) as (uncond, cond)
        pairs per view, the order diffusers' panorama pipeline uses: (2N, ...); else (N, ...)."""
        chosen = conditional[rows]
        if not self.uses_guidance:
            return chosen
        return torch.stack([negative.expand_as(chosen), chosen], dim=1).flatten(0, 1)


class GuidedSDXLUNetDenoiser(GuidedUNetDenoiser):
    """An SDXL UNet with classifier-free guidance, as diffusers' ``StableDiffusionXLPipeline`` conditions it.

    As ``GuidedUNetDenoiser`` (prompt_embeds (P, 77, D1 + D2): both text encoders' penultimate states,
    concatenated; negative_embeds (1, 77, D1 + D2)), plus what SDXL's UNet takes through ``added_cond_kwargs``:
    pooled_embeds (P, D_pool), the second text encoder's projected pooled output of each prompt row, and
    negative_pooled (1, D_pool); time_ids (1, 6), the size and crop conditioning every view gets (``sdxl_time_ids``:
    each view conditioned as a whole image of the window's size), for both guidance branches.
    """

    def __init__(self, unet, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                 pooled_embeds: torch.Tensor, negative_pooled: torch.Tensor | None, time_ids: torch.Tensor,
                 guidance_scale: float, view_prompts: list[int] | None = None):
        super().__init__(unet, prompt_embeds, negative_embeds, guidance_scale, view_prompts)
        self.pooled_embeds = pooled_embeds
        self.negative_pooled = negative_pooled
        self.time_ids = time_ids

    def conditioning(self, rows: list[int]) -> dict:
        """``GuidedUNetDenoiser.conditioning`` plus ``added_cond_kwargs``: each row's pooled embedding
        (``text_embeds``, (2N, D_pool) with guidance) and the time ids (``time_ids``, (2N, 6))."""
        text_embeds = self.guided_rows(self.pooled_embeds, self.negative_pooled, rows)
        time_ids = self.time_ids.expand(text_embeds.shape[0], -1)
        return {**super().conditioning(rows), "added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


class GuidedSD3TransformerDenoiser(GuidedUNetDenoiser):
    """A Stable Diffusion 3 transformer (``SD3Transformer2DModel``, an MMDiT) with classifier-free guidance, as
    diffusers' ``StableDiffusion3Pipeline`` conditions and guides it. Its prediction is the flow-matching velocity
    ε − x0 (``flow_matching.FlowMatchingSampler`` steps with it).

    transformer: the model (held as ``unet``, the attribute every denoiser calls). prompt_embeds (P, L, D): the joint
    text tokens of each prompt row (CLIP-L and CLIP-G penultimate states concatenated and zero-padded to T5's width,
    then T5's tokens, zeros without T5), negative_embeds (1, L, D); pooled_embeds (P, D_pool), the two CLIP
    encoders' pooled projections concatenated, negative_pooled (1, D_pool). Each view goes through the transformer
    as a whole image of the window's size, so its patches take the positions of such an image (the centred crop of
    the ``pos_embed_max_size`` grid that diffusers' ``PatchEmbed`` takes for that size). No guidance-distilled
    embedding: ``guidance_scale`` <= 1 skips the unconditional pass, as the pipeline does.
    """

    def __init__(self, transformer, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                 pooled_embeds: torch.Tensor, negative_pooled: torch.Tensor | None, guidance_scale: float,
                 view_prompts: list[int] | None = None):
        super().__init__(transformer, prompt_embeds, negative_embeds, guidance_scale, view_prompts)
        self.pooled_embeds = pooled_embeds
        self.negative_pooled = negative_pooled

    def run_model(self, model_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The transformer's velocity for ``model_input`` (B, C, h, w); the timestep (σ · 1000) given per row, as
        the pipeline gives it."""
        timestep = torch.as_tensor(timestep, device=model_input.device).expand(model_input.shape[0])
        return self.unet(hidden_states=model_input, timestep=timestep, **conditioning).sample

    def conditioning(self, rows: list[int]) -> dict:
        """``GuidedUNetDenoiser.conditioning`` (the joint text tokens) plus each row's ``pooled_projections``
        ((2N, D_pool) with guidance, else (N, D_pool))."""
        return {**super().conditioning(rows),
                "pooled_projections": self.guided_rows(self.pooled_embeds, self.negative_pooled, rows)}


def sdxl_time_ids(unet, view_pixels: int, pooled_width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's six micro-conditioning ids for a view of ``view_pixels`` x ``view_pixels`` image pixels, (1, 6):
    original size, crop top-left (0, 0), target size, as diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``
    makes them for an uncropped image of that size. ``pooled_width``: the pooled text embedding's width (the second
    text encoder's ``projection_dim``). Raises ValueError with one sentence when the UNet's added embedding does
    not take six ids and an embedding of that width (a refiner's five ids with an aesthetic score, say)."""
    ids = [view_pixels, view_pixels, 0, 0, view_pixels, view_pixels]
    expected = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * len(ids) + pooled_width
    if given != expected:
        raise ValueError(f"This SDXL UNet's added embedding takes {expected} values, not the {given} of six size and "
                         f"crop ids and a {pooled_width}-wide pooled text embedding; it is not a text-to-image SDXL "
                         "base model (a refiner?).")
    return torch.tensor([ids], dtype=dtype, device=device)


def guidance_scale_embedding(guidance_scale: float, dim: int) -> torch.Tensor:
    """The (1, dim) float32 sinusoidal embedding of w − 1 (scaled by 1000) that guidance-distilled LCM UNets take
    as ``timestep_cond``: the formula of diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``."""
    w = torch.tensor([(guidance_scale - 1.0) * 1000.0])
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding
