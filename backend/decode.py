"""Decoding a canvas latent to an image, aware of wrap-around, in tiles of bounded size.

The VAE decoder pads with zeros and normalises over the whole map, so decoding a wrapping canvas as a
flat image would darken and break its edges. Each tile is therefore decoded with ``context`` extra latent
pixels around it, read across the wrap on wrapping axes, and only its core is kept. An equirect canvas
gets context across the poles as well (the rows beyond a pole are the rows next to it, half a turn round:
``geometry.equirect_padding_indices``), so the zenith and nadir are decoded from their real neighbours
instead of a zero border, which would ring the poles with a dark cap. Large canvases are cut
into tiles of ``tile`` latent pixels that overlap by ``overlap``; overlapping cores are blended with linear
ramps so tile borders do not show. A canvas of at most ``max_single`` latents per side is decoded in one
piece (with circular context where it wraps, as diffusers' panorama pipeline does), so the peak memory of
any decode is that of one tile of at most ``max(max_single, tile) + 2 * context`` latents per side.
"""

from __future__ import annotations

import torch

from .canvas import Canvas, CropView, window_starts
from .geometry import equirect_padding_indices


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
    source, source_canvas, offset = latents, canvas, 0
    if canvas.kind == "equirect":
        # Pad the rows with their neighbours across the poles (columns wrap as before): full context above
        # and below every tile.
        offset = min(context, height)
        rows, cols = equirect_padding_indices(height, width, offset)
        rows, cols = rows[:, offset : offset + width], cols[:, offset : offset + width]
        source = latents[:, :, torch.as_tensor(rows, device=latents.device), torch.as_tensor(cols, device=latents.device)]
        source_canvas = Canvas("equirect", height + 2 * offset, width)
    row_tiles = axis_tiles(height, tile, overlap, max_single, canvas.wraps_y)
    col_tiles = axis_tiles(width, tile, overlap, max_single, canvas.wraps_x)
    factor = None
    image = weights = pixels = None
    for top, tile_height in row_tiles:
        for left, tile_width in col_tiles:
            # Context around the core: across the wrap where the axis wraps, else as far as the canvas goes.
            before_y, after_y = _context(top, tile_height, height, context, canvas.wraps_y, offset)
            before_x, after_x = _context(left, tile_width, width, context, canvas.wraps_x, 0)
            region = CropView(offset + top - before_y, left - before_x,
                              before_y + tile_height + after_y, before_x + tile_width + after_x)
            z = source_canvas.read(source, [region]) / vae.config.scaling_factor
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


def _context(start: int, length: int, size: int, context: int, wraps: bool, padded: int) -> tuple[int, int]:
    """Latent pixels of context (before, after) a tile core [start, start + length) of an axis of ``size``:
    ``context`` where the axis wraps, ``padded`` where the canvas was padded with its sphere neighbours
    (equirect), else as far as the canvas goes."""
    if padded:
        return padded, padded
    if wraps:
        return context, context
    return min(context, start), min(context, size - start - length)


POLE_CAP_BLEND = (50.0, 60.0)
"""Latitudes (degrees) between which ``decode_pole_caps`` blends from the equirect decode to the face decode."""


@torch.no_grad()
def decode_pole_caps(vae, latents: torch.Tensor, image: torch.Tensor, blend: tuple[float, float] = POLE_CAP_BLEND) -> torch.Tensor:
    """The decoded equirect ``image`` with its polar caps decoded as the up and down cube faces instead.

    Near a pole an equirect latent is a thin circle stretched across the whole width; the VAE decodes its
    8 x 8 pixel texture there as horizontal bands, which seen from inside the sphere are rings round the
    zenith and nadir. The faces U and D (FOV 90°), read from the canvas ``latents`` (1, C, H, 2H) at W/4
    latents (the canvas's own resolution at the face centres) and decoded as ordinary square images, have
    no such stretch. ``image`` (1, 3, H·f, 2H·f) float32 in [0, 1] is ``decode_canvas``'s output; every pixel
    above ``blend[1]`` latitude (below −``blend[1]``) takes the face's bilinear sample in its direction,
    pixels between ``blend[0]`` and ``blend[1]`` a linear mix, the rest keep the equirect decode. Returns
    the new image, same shape; the faces' own borders (zero-padded in the decoder) lie outside the caps.
    """
    import numpy as np
    import torch.nn.functional as F

    from .geometry import equirect_to_direction, sampling_grid
    from .view_sets import CanvasViews, pole_faces

    _, _, height, width = latents.shape
    canvas = Canvas("equirect", height, width)
    faces = CanvasViews(canvas, (), pole_faces(), size=max(1, width // 4)).read(latents)
    decoded = (vae.decode(faces / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1).to(image.device)
    face_pixels = decoded.shape[-1]
    image_height, image_width = image.shape[-2:]
    cap_rows = int(np.ceil(image_height * (90.0 - blend[0]) / 180.0))
    result = image.clone()
    for index, (label, view) in enumerate(pole_faces()):
        rows = np.arange(cap_rows) if label == "U" else np.arange(image_height - cap_rows, image_height)
        cols, rows = np.meshgrid(np.arange(image_width), rows)
        directions = equirect_to_direction(cols, rows, image_width, image_height)
        col, row, _ = view.project(directions, face_pixels)
        grid = sampling_grid(col, row, face_pixels, face_pixels)[None].to(image.device)
        sampled = F.grid_sample(decoded[index : index + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
        latitude = np.degrees(np.arcsin(np.clip(np.abs(directions[..., 1]), 0.0, 1.0)))
        weight = torch.from_numpy(np.clip((latitude - blend[0]) / (blend[1] - blend[0]), 0.0, 1.0)).float().to(image.device)
        image_rows = torch.as_tensor(rows[:, 0], device=image.device)
        part = result[:, :, image_rows]
        result[:, :, image_rows] = part + weight * (sampled - part)
    return result
