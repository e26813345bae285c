"""MultiDiffusion (Bar-Tal et al., 2023): fuse the views by averaging them where they overlap.

For crop views the averaged quantity is each view's x_{t-1} after its own scheduler step, which is what
the paper and diffusers' ``StableDiffusionPanoramaPipeline`` do.
"""

from __future__ import annotations

import torch

from ..canvas import Canvas, CropView


def fuse_views(canvas: Canvas, views: list[CropView], view_latents: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Average the views onto the canvas.

    view_latents: (len(views), C, h, w), one latent per view, in the order of ``views``.
    coverage: (1, 1, H, W) number of views covering each canvas position (``Canvas.coverage``), > 0.
    Returns the canvas latent (1, C, H, W).
    """
    total = torch.zeros(1, view_latents.shape[1], canvas.height, canvas.width, dtype=view_latents.dtype, device=view_latents.device)
    for index, view in enumerate(views):
        canvas.add(total, view, view_latents[index : index + 1])
    return total / coverage
