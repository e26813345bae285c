"""A cheap picture of the canvas while it is denoised: the latent → RGB preview behind ``--preview-every``.

The denoising loop hands the job its canvas's predicted clean latent x0 on the preview steps
(``sampler.preview_steps``); ``canvas_preview`` turns it into an sRGB image the job writes as a PNG
(``products.outputs.PreviewFile``). Two ways, the better one that is available:

- **The tiny autoencoder** (TAESD, madebyollin's distilled VAE decoder, diffusers' ``AutoencoderTiny``) of the
  model's latent family, when it is in the local Hugging Face cache (never downloaded for a preview: it is
  downloaded by ``--sync-decoder taesd`` online, or by hand). A real decoder, so the preview looks like the
  result; its input is cut to ``TAESD_MAX_WIDTH`` image pixels wide.
- **A linear projection** otherwise: each latent pixel's C channels times a fixed C × 3 matrix plus a bias
  gives one RGB pixel in [-1, 1] (the VAE's output range), so the preview has the latent's resolution (an
  1/8 of the image's for Stable Diffusion: 256 × 128 for a 2048 × 1024 world). Costs one small matmul.

The matrices (``LATENT_RGB_FACTORS``) are the community's least-squares fits of each VAE's decoder, as
ComfyUI ships them (``comfy/latent_formats.py``, classes ``SD15`` and ``SDXL``; the SDXL one with its bias):
they act on the latents the UNet sees (the VAE's latents times its ``scaling_factor``), which is the space
our canvas is in. Stable Diffusion 1.x and 2.x share one VAE (``scaling_factor`` 0.18215), so one matrix
serves both; SDXL's VAE (``scaling_factor`` 0.13025) has its own. A VAE of neither family with 4 latent
channels (a model trained from scratch, such as the development model toy-landscape) gets the SD 1/2 matrix:
its colours are then only indicative, its shapes still right. tests/test_preview.py fits a matrix to the toy
model's VAE by least squares the same way and checks the projection against the VAE decode.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import torch

LATENT_RGB_FACTORS = {
    # Stable Diffusion 1.x / 2.x (one VAE): rows are the 4 latent channels, columns R, G, B; no bias.
    "sd": ([[0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]],
           [0.0, 0.0, 0.0]),
    # SDXL's VAE.
    "sdxl": ([[0.3651, 0.4232, 0.4341],
              [-0.2533, -0.0042, 0.1068],
              [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]],
             [0.1084, -0.0175, -0.0011]),
}
"""(C × 3 matrix, bias (3,)) per latent family: RGB in [-1, 1] = latent (as the UNet sees it) @ matrix + bias."""

SDXL_SCALING_FACTOR = 0.13025
"""SDXL's VAE ``scaling_factor``: how a model's latent family is told (``latent_family``)."""

TINY_AUTOENCODER_OF_FAMILY = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
"""The TAESD decoder of each latent family on the Hugging Face hub (used only when it is cached)."""

TAESD_MAX_WIDTH = 1024
"""Widest TAESD preview in image pixels: a wider canvas's latent is averaged down before it is decoded, which
bounds the preview's cost (and the PNG's) whatever the canvas size."""

CanvasPreview = Callable[[torch.Tensor], np.ndarray]
"""latent (1, C, H, W) as the UNet sees it → (h, w, 3) float32 sRGB-encoded in [0, 1], h/w = H/W."""


def latent_family(vae_config) -> str | None:
    """"sd" or "sdxl": the ``LATENT_RGB_FACTORS`` key of a VAE config (dict-like: ``latent_channels``,
    ``scaling_factor``); None for latents of another channel count (no matrix fits them)."""
    if int(vae_config.get("latent_channels", 4)) != 4:
        return None
    return "sdxl" if math.isclose(float(vae_config.get("scaling_factor", 0.18215)), SDXL_SCALING_FACTOR) else "sd"


class LinearPreview:
    """The linear latent → RGB projection: ``LinearPreview(matrix, bias)(latent)``.

    matrix: (C, 3) and bias (3,), floats (``LATENT_RGB_FACTORS``' form). Calling it on a latent (1, C, H, W)
    of any dtype and device returns an (H, W, 3) float32 array in [0, 1]: (latent @ matrix + bias + 1) / 2,
    clipped. Rows run top to bottom as the canvas's do, so the image has the canvas's aspect.
    """

    name = "linear"

    def __init__(self, matrix, bias=(0.0, 0.0, 0.0)):
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, latent: torch.Tensor) -> np.ndarray:
        pixels = latent[0].float().permute(1, 2, 0) @ self.matrix.to(latent.device) + self.bias.to(latent.device)
        return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()


class TinyAutoencoderPreview:
    """The TAESD preview: ``decoder`` (a diffusers ``AutoencoderTiny`` on the model's device) decodes the latent,
    first averaged down so the image is at most ``max_width`` pixels wide. Returns (h, w, 3) float32 in [0, 1]."""

    name = "taesd"

    def __init__(self, decoder, vae_scale_factor: int, max_width: int = TAESD_MAX_WIDTH):
        self.decoder = decoder
        self.vae_scale_factor = vae_scale_factor
        self.max_width = max_width

    @torch.no_grad()
    def __call__(self, latent: torch.Tensor) -> np.ndarray:
        import torch.nn.functional as F

        _, _, height, width = latent.shape
        shrink = max(1, math.ceil(width * self.vae_scale_factor / self.max_width))
        if shrink > 1:
            latent = F.interpolate(latent.float(), size=(max(1, height // shrink), max(1, width // shrink)), mode="area")
        scaled = (latent / self.decoder.config.scaling_factor).to(self.decoder.device, self.decoder.dtype)
        image = self.decoder.decode(scaled).sample[0].float()
        return (image / 2 + 0.5).clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()


def canvas_preview(vae_config, vae_scale_factor: int, device: torch.device, dtype: torch.dtype,
                   warn: Callable[[str], None] | None = None) -> CanvasPreview | None:
    """The best preview for latents of a model whose VAE has ``vae_config``: its family's TAESD when the local
    Hugging Face cache has it (loaded on ``device`` in ``dtype``, nothing downloaded), else its family's
    ``LinearPreview``; None for latents no matrix fits (not 4 channels), after ``warn`` (default: stderr) says
    so. The result has a ``name``: "taesd" or "linear"."""
    from .models import load_tiny_autoencoder
    from ..errors import SyncSphereError

    family = latent_family(vae_config)
    if family is None:
        (warn or _warn)(f"no preview for latents of {vae_config.get('latent_channels')} channels: SyncSphere knows "
                        "the latent colours of 4-channel (Stable Diffusion 1, 2 and XL) models only")
        return None
    linear = LinearPreview(*LATENT_RGB_FACTORS[family])
    if not is_tiny_autoencoder_cached(TINY_AUTOENCODER_OF_FAMILY[family]):
        return linear
    try:
        decoder = load_tiny_autoencoder(TINY_AUTOENCODER_OF_FAMILY[family], device, dtype, 4, local_only=True)
    except SyncSphereError:  # an incomplete copy in the cache: the linear projection needs nothing
        return linear
    return TinyAutoencoderPreview(decoder, vae_scale_factor)


def is_tiny_autoencoder_cached(hub_id: str) -> bool:
    """Whether the local Hugging Face cache has ``hub_id``'s config (asked without loading anything, so a missing
    one costs no hub warning)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
