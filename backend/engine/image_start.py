"""The image a job starts from (``--init-image``, ``--upscale``, ``python -m backend upscale``): resized to the
canvas wrap-aware, encoded wrap-aware (``decode.encode_canvas``), and handed to the loop as an ``ImageStart``.

The app layer reads the file (``products.images.read_start_image``); everything here takes the image as an array.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..sphere.canvas import Canvas, CropView
from ..sphere.geometry import equirect_padding_indices
from .decode import encode_canvas
from .sampler import ImageStart

RESIZE_CONTEXT = 8
"""Source pixels (at least) of wrapped neighbours around an image before it is resized, so the bicubic kernel
(4 taps, wider when it antialiases a reduction) reads the other side of the wrap instead of a clamped edge."""


def resize_wrapped(image: torch.Tensor, height: int, width: int, kind: str) -> torch.Tensor:
    """``image`` (1, 3, h, w) float resized to (1, 3, height, width) bicubically (antialiased when it shrinks),
    clipped to [0, 1], seamless where the canvas ``kind`` wraps: a tile's four edges, an equirect's ±180°
    and its poles (the rows across a pole are its neighbours, ``geometry.equirect_padding_indices``); a wide
    panorama's edges are the image's. Each wrapping axis is padded with its neighbours by a whole number of
    the pixels that map onto whole output pixels, resized, and the padding cut off again, so the result lines
    up exactly with a plain resize of the unpadded image."""
    _, _, source_height, source_width = image.shape
    pad_y = _pad(source_height, height) if kind in ("tile", "equirect") else 0
    pad_x = _pad(source_width, width) if kind in ("tile", "equirect") else 0
    if kind == "equirect" and pad_y:
        rows, cols = equirect_padding_indices(source_height, source_width, pad_y)
        rows, cols = rows[:, pad_y : pad_y + source_width], cols[:, pad_y : pad_y + source_width]
        image = image[:, :, torch.as_tensor(rows), torch.as_tensor(cols)]
        image = Canvas("equirect", image.shape[-2], source_width).read(image, [CropView(0, -pad_x, image.shape[-2], source_width + 2 * pad_x)])
    elif pad_x or pad_y:
        image = Canvas("tile", source_height, source_width).read(
            image, [CropView(-pad_y, -pad_x, source_height + 2 * pad_y, source_width + 2 * pad_x)])
    out_pad_y, out_pad_x = pad_y * height // source_height, pad_x * width // source_width
    resized = F.interpolate(image.float(), size=(height + 2 * out_pad_y, width + 2 * out_pad_x), mode="bicubic",
                            align_corners=False, antialias=True)
    return resized[:, :, out_pad_y : out_pad_y + height, out_pad_x : out_pad_x + width].clamp(0, 1)


def _pad(source: int, target: int) -> int:
    """The padding, in source pixels, of an axis resized from ``source`` to ``target`` pixels: the smallest
    multiple of source / gcd (which maps onto a whole number of target pixels) of at least RESIZE_CONTEXT
    source and target pixels (scaled to the larger side), at most the axis itself."""
    unit = source // math.gcd(source, target)
    wanted = max(RESIZE_CONTEXT, math.ceil(RESIZE_CONTEXT * source / target))
    return min(source, unit * math.ceil(wanted / unit))


def image_start(image: np.ndarray, canvas: Canvas, vae_scale_factor: int, vae, strength: float,
                device: torch.device, dtype: torch.dtype) -> ImageStart:
    """The loop's ``ImageStart`` from ``image`` (H, W, 3) float sRGB-encoded in [0, 1] of any size: resized to
    the ``canvas``'s pixels (its latents times ``vae_scale_factor``; ``resize_wrapped``), encoded with ``vae``
    (``decode.encode_canvas``, tiled and wrap-aware) and put on ``device`` in ``dtype``, with ``strength``."""
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    pixels = resize_wrapped(pixels, canvas.height * vae_scale_factor, canvas.width * vae_scale_factor, canvas.kind)
    latent = encode_canvas(vae, pixels, canvas)
    return ImageStart(latent.to(device, dtype), strength)
