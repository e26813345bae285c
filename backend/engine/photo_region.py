"""Extend a photo into a world (``--photo``, issue 18): the photo placed on the equirect canvas where its camera
saw it, the loop's ``KnownRegion`` (its latent and where that latent is kept), and the photo composited back over
the decoded image.

The loop keeps the photo's region in the fused clean latent x0 at every step (``sampler.KnownRegion``), so the
rest of the canvas is painted around it; the decoded region is then replaced by the photo itself with a feathered
edge (``composite_photo``), as the VAE's own reconstruction error is larger than the 3/255 the region must keep.
The app layer reads the file (``products.images.read_start_image``); everything here takes arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sphere.canvas import Canvas
from ..sphere.geometry import project_photo
from .decode import encode_canvas
from .sampler import KnownRegion

PHOTO_FEATHER_PX = 3
"""Equirect pixels inside the photo's border over which the composite blends from the photo (inside) to the
generated image (at the border): enough to hide a step, few enough that the region stays the photo."""


@dataclass(frozen=True)
class PhotoRegion:
    """A photo placed on an equirect canvas of H x W px.

    pixels: (H, W, 3) float32 sRGB-encoded in [0, 1]: the photo where it lies, its edge pixels repeated beyond
        its border in front of the camera, its mean colour behind (what the VAE encodes around the region).
    inside: (H, W) bool, the pixels whose centre falls on the photo (``geometry.project_photo``).
    alpha: (H, W) float32 in [0, 1]: the composite's weight of the photo, 1 from ``PHOTO_FEATHER_PX`` inside the
        border inwards, falling towards it in equal steps (1/4, 1/2, 3/4 for 3 px), 0 outside.
    """

    pixels: np.ndarray
    inside: np.ndarray
    alpha: np.ndarray


def photo_region(photo: np.ndarray, fov: float, yaw: float, pitch: float, width: int, height: int) -> PhotoRegion:
    """The ``PhotoRegion`` of ``photo`` ((h, w, 3) float sRGB in [0, 1], any size and aspect) seen with the horizontal
    field of view ``fov`` at (``yaw``, ``pitch``) in degrees, on an equirect of ``width`` x ``height`` px."""
    pixels, inside = project_photo(photo, fov, yaw, pitch, width, height)
    pixels[np.isnan(pixels[..., 0])] = np.asarray(photo, np.float32).reshape(-1, photo.shape[-1]).mean(axis=0)
    return PhotoRegion(pixels, inside, _feathered(inside, PHOTO_FEATHER_PX))


def _feathered(inside: np.ndarray, feather: int) -> np.ndarray:
    """(H, W) float32: 0 outside the equirect mask ``inside``; inside, 1 + how many of ``feather`` successive
    erosions (4-neighbours; columns wrap across ±180°, rows stop at the poles) a pixel survives, over ``feather`` + 1
    (the border pixel is already part photo: the step from the pixel outside it is as small as the others)."""
    alpha = inside.astype(np.float32)
    eroded = inside.copy()
    for _ in range(feather):
        padded = np.pad(eroded, ((1, 1), (0, 0)), mode="edge")
        eroded = (eroded & padded[:-2] & padded[2:] & np.roll(eroded, 1, axis=1) & np.roll(eroded, -1, axis=1))
        alpha += eroded
    return alpha / (feather + 1)


def known_region(region: PhotoRegion, canvas: Canvas, vae_scale_factor: int, vae, device: torch.device,
                 dtype: torch.dtype) -> KnownRegion:
    """The loop's ``KnownRegion`` of a ``region`` on ``canvas`` (its pixels are the canvas's latents times
    ``vae_scale_factor``): the region's pixels encoded with ``vae`` (``decode.encode_canvas``, tiled and
    wrap-aware), and a latent mask that is 1 only where all of a latent pixel's pixels are on the photo (a
    latent half on the photo would keep the encoding of what lies around it). On ``device`` in ``dtype``."""
    pixels = torch.from_numpy(np.ascontiguousarray(region.pixels)).permute(2, 0, 1)[None]
    latent = encode_canvas(vae, pixels, canvas)
    f = vae_scale_factor
    kept = region.inside.reshape(canvas.height, f, canvas.width, f).all(axis=(1, 3))
    mask = torch.from_numpy(kept.astype(np.float32))[None, None]
    return KnownRegion(latent.to(device, dtype), mask.to(device, dtype))


def composite_photo(image: np.ndarray, region: PhotoRegion) -> np.ndarray:
    """``image`` (H, W, 3) float in [0, 1] (the decoded canvas) with the photo over it: alpha · photo + (1 - alpha)
    · image, with the region's feathered ``alpha``. Returns a new float32 array."""
    alpha = region.alpha[..., None]
    return (alpha * region.pixels + (1.0 - alpha) * image).astype(np.float32)


def photo_details(region: PhotoRegion, known: KnownRegion) -> dict:
    """What metadata.json records of the photo's region besides its parameters: the share of the canvas's pixels
    on the photo ("pixel_share") and of its latents kept ("latent_share"), both in [0, 1]."""
    return {"pixel_share": float(region.inside.mean()), "latent_share": float(known.mask.float().mean())}
