"""Decoding a canvas latent to an image, aware of wrap-around, in tiles of bounded size.

The VAE decoder pads with zeros and normalises over the whole map, so decoding a wrapping canvas as a
flat image would darken and break its edges. Each tile is therefore decoded with ``context`` extra latent
pixels around it, read across the wrap on wrapping axes, and only its core is kept. Large canvases are cut
into tiles of ``tile`` latent pixels that overlap by ``overlap``; overlapping cores are blended with linear
ramps so tile borders do not show. A canvas of at most ``max_single`` latents per side is decoded in one
piece (with circular context where it wraps, as diffusers' panorama pipeline does), so the peak memory of
any decode is that of one tile of at most ``max(max_single, tile) + 2 * context`` latents per side.
"""

from __future__ import annotations

import torch

from .canvas import Canvas, CropView, window_starts


def axis_tiles(size: int, tile: int, overlap: int, max_single: int, wraps: bool) -> list[tuple[int, int]]:
    """(start, length) of the tile cores along one axis of ``size`` latent pixels; they cover the axis."""
    if size <= max_single:
        return [(0, size)]
    return [(start, tile) for start in window_starts(size, tile, tile - overlap, wraps)]


def blend_weights(start: int, length: int, size: int, tile_count: int, wraps: bool, ramp: int) -> torch.Tensor:
    """Blend weights (length,) in (0, 1] of one tile core along one axis, in pixels.

    The weight rises linearly over ``ramp`` pixels at each end that a neighbouring tile overlaps (both
    ends on a wrapping axis, inner ends only on a planar one) and is 1 elsewhere.
    """
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if tile_count > 1 and (wraps or start > 0):
        weight = torch.minimum(weight, position / ramp)
    if tile_count > 1 and (wraps or start + length < size):
        weight = torch.minimum(weight, (length - position) / ramp)
    return weight


@torch.no_grad()
def decode_canvas(
    vae,
    latents: torch.Tensor,
    canvas: Canvas,
    tile: int = 96,
    overlap: int = 16,
    context: int = 8,
    max_single: int = 128,
) -> torch.Tensor:
    """Decode the canvas latent (1, C, H, W) with ``vae`` into an image (1, 3, H*f, W*f), float32 in [0, 1].

    The image is display-referred (sRGB-encoded) like every Stable Diffusion output. ``tile``, ``overlap``,
    ``context`` and ``max_single`` are in latent pixels (see the module docstring).
    """
    _, _, height, width = latents.shape
    row_tiles = axis_tiles(height, tile, overlap, max_single, canvas.wraps_y)
    col_tiles = axis_tiles(width, tile, overlap, max_single, canvas.wraps_x)
    factor = None
    image = weights = pixels = None
    for top, tile_height in row_tiles:
        for left, tile_width in col_tiles:
            # Context around the core: across the wrap where the axis wraps, else as far as the canvas goes.
            before_y, after_y = _context(top, tile_height, height, context, canvas.wraps_y)
            before_x, after_x = _context(left, tile_width, width, context, canvas.wraps_x)
            region = CropView(top - before_y, left - before_x, before_y + tile_height + after_y, before_x + tile_width + after_x)
            z = canvas.read(latents, [region]) / vae.config.scaling_factor
            decoded = vae.decode(z).sample.float()
            if factor is None:
                factor = decoded.shape[-1] // region.width
                pixels = Canvas(canvas.kind, height * factor, width * factor)
                image = torch.zeros(1, 3, height * factor, width * factor, device=decoded.device)
                weights = torch.zeros(1, 1, height * factor, width * factor, device=decoded.device)
            core = decoded[:, :, before_y * factor : (before_y + tile_height) * factor, before_x * factor : (before_x + tile_width) * factor]
            ramp = max(1, overlap * factor)
            row_weight = blend_weights(top * factor, tile_height * factor, height * factor, len(row_tiles), canvas.wraps_y, ramp)
            col_weight = blend_weights(left * factor, tile_width * factor, width * factor, len(col_tiles), canvas.wraps_x, ramp)
            weight = (row_weight[:, None] * col_weight[None, :]).to(decoded.device)
            core_view = CropView(top * factor, left * factor, tile_height * factor, tile_width * factor)
            pixels.add(image, core_view, core * weight)
            pixels.add(weights, core_view, weight)
    return (image / weights / 2 + 0.5).clamp(0, 1).cpu()


def _context(start: int, length: int, size: int, context: int, wraps: bool) -> tuple[int, int]:
    if wraps:
        return context, context
    return min(context, start), min(context, size - start - length)
