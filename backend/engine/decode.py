"""Decoding a canvas latent to an image, and encoding an image to a canvas latent (img2img, upscaling), aware
of wrap-around, in tiles of bounded size.

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
``encode_canvas`` runs the encoder over the same tiles with the same context (``_in_canvas_tiles``): the
encoder's zero padding would make the same seams.
"""

from __future__ import annotations

import torch

from ..sphere.canvas import Canvas, CropView, window_starts
from ..sphere.geometry import equirect_padding_indices


# decode_canvas's tiling, in latent pixels (see the module docstring).
DECODE_TILE, DECODE_OVERLAP, DECODE_CONTEXT, DECODE_MAX_SINGLE = 96, 16, 8, 128


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


def vae_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """The latents ``vae``'s decoder takes for the model's latents (N, C, h, w): divided by the VAE's
    ``scaling_factor`` and, for a VAE with a ``shift_factor`` (SD3's), shifted by it, as diffusers' pipelines undo
    their encoding; in the VAE's dtype. Same shape; differentiable (SyncDiffusion decodes through it)."""
    return (latents / vae.config.scaling_factor + _latent_shift(vae)).to(vae.dtype)


def _latent_shift(vae) -> float:
    """The ``shift_factor`` of ``vae``'s latents (SD3's), 0 for a VAE without one."""
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def decode_canvas(
    vae,
    latents: torch.Tensor,
    canvas: Canvas,
    tile: int = DECODE_TILE,
    overlap: int = DECODE_OVERLAP,
    context: int = DECODE_CONTEXT,
    max_single: int = DECODE_MAX_SINGLE,
    in_strips: bool = False,
) -> torch.Tensor:
    """Decode the canvas latent (1, C, H, W) with ``vae`` into an image (1, 3, H*f, W*f), float32 in [0, 1].

    The image is display-referred (sRGB-encoded) like every Stable Diffusion output. ``tile``, ``overlap``,
    ``context`` and ``max_single`` are in latent pixels (see the module docstring). ``in_strips`` decodes
    each tile with ``decode_in_strips`` (``--memory low``): the same image with less memory.
    """

    def decode(z: torch.Tensor) -> torch.Tensor:
        z = vae_latents(z, vae)
        return decode_in_strips(vae, z) if in_strips else vae.decode(z).sample

    image = _in_canvas_tiles(decode, latents, canvas, 1, tile, overlap, context, max_single)
    return (image / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def encode_canvas(
    vae,
    image: torch.Tensor,
    canvas: Canvas,
    tile: int = DECODE_TILE,
    overlap: int = DECODE_OVERLAP,
    context: int = DECODE_CONTEXT,
    max_single: int = DECODE_MAX_SINGLE,
) -> torch.Tensor:
    """Encode an image (1, 3, H*f, W*f) float in [0, 1] (sRGB-encoded, as the model's images are) of a
    ``canvas`` of H x W latents with ``vae`` into the canvas latent (1, C, H, W), scaled by the VAE's scaling
    factor, on the VAE's device in float32: the mean of the encoder's distribution (no sampling, so the
    tiles agree). Tiled and wrap-aware exactly as ``decode_canvas`` (the same tiles, context and blending,
    in latent pixels), so the encoder sees the wrapped neighbours across ±180° (and the rows across the
    poles of an equirect, the torus of a tile) instead of a zero border, and no tile is larger than the
    decoder's. ``image`` may stay on the CPU; each tile is moved to the VAE's device."""
    device = next(vae.parameters()).device

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pixels = (pixels.to(device, vae.dtype) * 2 - 1)
        return vae.encode(pixels).latent_dist.mean

    encoded = _in_canvas_tiles(encode, image, canvas, image.shape[-1] // canvas.width, tile, overlap, context, max_single)
    return (encoded - _latent_shift(vae)) * vae.config.scaling_factor  # vae_latents' inverse


def _in_canvas_tiles(apply, source: torch.Tensor, canvas: Canvas, scale: int, tile: int, overlap: int, context: int,
                     max_single: int) -> torch.Tensor:
    """``apply`` (a VAE's decoder or encoder) over ``source`` (1, c, H*scale, W*scale), the tensor of a
    ``canvas`` of H x W latents at ``scale`` of its pixels per latent, tile by tile, blended: (1, c', H*f, W*f)
    float32, where f is ``apply``'s output pixels per latent pixel. Tiles are laid out in latent pixels
    (``axis_tiles``); each is read with ``context`` latents around it, across the wrap on wrapping axes and
    across the poles of an equirect (its rows padded with their sphere neighbours), and only its core is kept;
    overlapping cores blend with linear ramps (``blend_weights``)."""
    height, width = canvas.height, canvas.width
    source_canvas, offset = Canvas(canvas.kind, source.shape[-2], source.shape[-1]), 0
    if canvas.kind == "equirect":
        # Pad the rows with their neighbours across the poles (columns wrap as before): full context above
        # and below every tile.
        offset = min(context, height)
        pad = offset * scale
        rows, cols = equirect_padding_indices(source.shape[-2], source.shape[-1], pad)
        rows, cols = rows[:, pad : pad + source.shape[-1]], cols[:, pad : pad + source.shape[-1]]
        source = source[:, :, torch.as_tensor(rows, device=source.device), torch.as_tensor(cols, device=source.device)]
        source_canvas = Canvas("equirect", source.shape[-2], source.shape[-1])
    row_tiles = axis_tiles(height, tile, overlap, max_single, canvas.wraps_y)
    col_tiles = axis_tiles(width, tile, overlap, max_single, canvas.wraps_x)
    factor = None
    image = weights = pixels = None
    for top, tile_height in row_tiles:
        for left, tile_width in col_tiles:
            # Context around the core: across the wrap where the axis wraps, else as far as the canvas goes.
            before_y, after_y = _context(top, tile_height, height, context, canvas.wraps_y, offset)
            before_x, after_x = _context(left, tile_width, width, context, canvas.wraps_x, 0)
            region_width = before_x + tile_width + after_x
            region = CropView((offset + top - before_y) * scale, (left - before_x) * scale,
                              (before_y + tile_height + after_y) * scale, region_width * scale)
            result = apply(source_canvas.read(source, [region])).float()
            if factor is None:
                factor = result.shape[-1] // region_width
                pixels = Canvas(canvas.kind, height * factor, width * factor)
                image = torch.zeros(1, result.shape[1], height * factor, width * factor, device=result.device)
                weights = torch.zeros(1, 1, height * factor, width * factor, device=result.device)
            core = result[:, :, before_y * factor : (before_y + tile_height) * factor, before_x * factor : (before_x + tile_width) * factor]
            ramp = max(1, overlap * factor)
            row_weight = blend_weights(top * factor, tile_height * factor, height * factor, len(row_tiles), canvas.wraps_y, ramp)
            col_weight = blend_weights(left * factor, tile_width * factor, width * factor, len(col_tiles), canvas.wraps_x, ramp)
            weight = (row_weight[:, None] * col_weight[None, :]).to(result.device)
            core_view = CropView(top * factor, left * factor, tile_height * factor, tile_width * factor)
            pixels.add(image, core_view, core * weight)
            pixels.add(weights, core_view, weight)
    return image / weights


def largest_decode_tile(height: int, width: int, layout: str) -> tuple[int, int]:
    """(rows, columns) in latent pixels, context included, of the largest tile ``decode_canvas`` decodes for a
    ``layout`` canvas of height x width latents with its default tiling: what bounds its memory."""
    canvas = Canvas(layout, height, width)
    offset = min(DECODE_CONTEXT, height) if layout == "equirect" else 0
    largest = []
    for size, wraps, padded in ((height, canvas.wraps_y, offset), (width, canvas.wraps_x, 0)):
        tiles = axis_tiles(size, DECODE_TILE, DECODE_OVERLAP, DECODE_MAX_SINGLE, wraps)
        largest.append(max(length + sum(_context(start, length, size, DECODE_CONTEXT, wraps, padded)) for start, length in tiles))
    return largest[0], largest[1]


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
def decode_pole_caps(vae, latents: torch.Tensor, image: torch.Tensor, blend: tuple[float, float] = POLE_CAP_BLEND,
                     in_strips: bool = False) -> torch.Tensor:
    """The decoded equirect ``image`` with its polar caps decoded as the up and down cube faces instead.

    Near a pole an equirect latent is a thin circle stretched across the whole width; the VAE decodes its
    8 x 8 pixel texture there as horizontal bands, which seen from inside the sphere are rings round the
    zenith and nadir. The faces U and D (FOV 90°), read from the canvas ``latents`` (1, C, H, 2H) at W/4
    latents (the canvas's own resolution at the face centres) and decoded as ordinary square images, have
    no such stretch. ``image`` (1, 3, H·f, 2H·f) float32 in [0, 1] is ``decode_canvas``'s output; every pixel
    above ``blend[1]`` latitude (below −``blend[1]``) takes the face's bilinear sample in its direction,
    pixels between ``blend[0]`` and ``blend[1]`` a linear mix, the rest keep the equirect decode.
    ``in_strips``: decode the faces one by one with ``decode_in_strips`` (``--memory low``). Returns
    the new image, same shape; the faces' own borders (zero-padded in the decoder) lie outside the caps.
    """
    import numpy as np
    import torch.nn.functional as F

    from ..sphere.geometry import equirect_to_direction, sampling_grid
    from ..sphere.view_sets import CanvasViews, pole_faces

    _, _, height, width = latents.shape
    canvas = Canvas("equirect", height, width)
    faces = CanvasViews(canvas, (), pole_faces(), size=max(1, width // 4)).read(latents)
    faces = vae_latents(faces, vae)
    if in_strips:  # one face at a time, each in strips (--memory low)
        decoded = torch.cat([decode_in_strips(vae, face) for face in faces.split(1)])
    else:
        decoded = vae.decode(faces).sample
    decoded = (decoded.float() / 2 + 0.5).clamp(0, 1).to(image.device)
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


# ---------------------------------------------------------------------------------------- strip decoding
# ``--memory low`` decodes each tile in horizontal strips. The decoder's full-resolution layers hold several
# tile-sized tensors at once (a resnet's input, its normalised copy, its activation, its conv output, the
# 4x upsampled copy before its conv). Decoding in strips keeps two tile-sized tensors per layer (input and
# output) and computes everything else strip by strip. GroupNorm is the only operation that sees the whole
# tile, so its statistics are gathered over the whole tensor first; the image is the same as vae.decode's,
# up to float rounding.

DECODE_STRIP_ROWS = 32
"""Output rows per strip of ``decode_in_strips``, at each layer's own resolution."""


def can_decode_in_strips(vae) -> bool:
    """Whether ``decode_in_strips`` knows ``vae``'s decoder: an AutoencoderKL whose up blocks are plain
    resnets (GroupNorm, SiLU, 3x3 convs) and nearest-neighbour upsamplers, as every Stable Diffusion VAE's
    are. Others (a tiny autoencoder, a spatially normalised decoder) are decoded with ``vae.decode``."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    decoder = getattr(vae, "decoder", None)
    if decoder is None or not hasattr(decoder, "up_blocks") or type(decoder.conv_norm_out) is not torch.nn.GroupNorm:
        return False
    for block in decoder.up_blocks:
        if type(block).__name__ != "UpDecoderBlock2D":
            return False
        for resnet in block.resnets:
            if (type(resnet) is not ResnetBlock2D or resnet.upsample is not None or resnet.downsample is not None
                    or resnet.time_emb_proj is not None or not isinstance(resnet.nonlinearity, torch.nn.SiLU)
                    or not all(_is_same_size_conv(conv) for conv in (resnet.conv1, resnet.conv2))):
                return False
        for upsampler in block.upsamplers or []:
            if (type(upsampler) is not Upsample2D or upsampler.use_conv_transpose or not upsampler.interpolate
                    or upsampler.norm is not None or not _is_same_size_conv(getattr(upsampler, "conv", None))):
                return False
    return isinstance(decoder.conv_act, torch.nn.SiLU) and _is_same_size_conv(decoder.conv_out)


def _is_same_size_conv(conv) -> bool:
    """A 3x3, stride-1, zero-padded-by-1 convolution: what ``_conv_rows`` reproduces strip by strip."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


@torch.no_grad()
def decode_in_strips(vae, z: torch.Tensor, strip_rows: int = DECODE_STRIP_ROWS) -> torch.Tensor:
    """``vae.decode(z).sample`` computed with less memory: z (N, C, h, w) scaled latents (already divided by
    the scaling factor) -> (N, 3, h·f, w·f) in the VAE's dtype, roughly in [-1, 1]. The mid block runs as
    usual (it is at latent resolution); every up-block layer is computed ``strip_rows`` rows at a time.
    Falls back to ``vae.decode`` when ``can_decode_in_strips`` is False."""
    if not can_decode_in_strips(vae):
        return vae.decode(z).sample
    decoder = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    hidden = decoder.mid_block(decoder.conv_in(z), None)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            hidden = _resnet_in_strips(resnet, hidden, strip_rows)
        for upsampler in block.upsamplers or []:
            hidden = _upsample_in_strips(upsampler, hidden, strip_rows)
    statistics = _group_statistics(hidden, decoder.conv_norm_out, strip_rows)
    height = hidden.shape[-2]
    image = hidden.new_empty(hidden.shape[0], decoder.conv_out.out_channels, height, hidden.shape[-1])
    for top, bottom in _strips(height, strip_rows):
        rows, pad = _rows_with_halo(hidden, top, bottom)
        image[:, :, top:bottom] = _conv_rows(decoder.conv_out, _group_norm_silu(rows, decoder.conv_norm_out, statistics), pad)
    return image


def _strips(height: int, strip_rows: int) -> list[tuple[int, int]]:
    return [(top, min(top + strip_rows, height)) for top in range(0, height, strip_rows)]


def _rows_with_halo(tensor: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Rows top-1 .. bottom+1 of ``tensor`` (N, C, H, W) that exist, and how many zero rows a 3x3 conv must
    add above and below (1 at the image's edges, where the full conv's padding would be)."""
    height = tensor.shape[-2]
    first, last = max(top - 1, 0), min(bottom + 1, height)
    return tensor[:, :, first:last], (1 - (top - first), 1 - (last - bottom))


def _conv_rows(conv: torch.nn.Conv2d, rows: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """``conv`` (3x3, padding 1) applied to a strip with one halo row each side (or ``pad`` zero rows where
    the strip meets the image's edge): the conv's output rows for the strip without its halo."""
    if pad != (0, 0):
        rows = torch.nn.functional.pad(rows, (0, 0, pad[0], pad[1]))
    return torch.nn.functional.conv2d(rows, conv.weight, conv.bias, padding=(0, 1))


def _group_statistics(tensor: torch.Tensor, norm: torch.nn.GroupNorm, strip_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's mean and 1/std per (sample, group) of ``tensor`` (N, C, H, W), both (N, G, 1, 1, 1)
    float32. Each strip's mean and variance are taken in float32 and merged in float64 (the parallel
    variance formula), so no tile-sized copy is made."""
    count, channels, height, width = tensor.shape
    groups = norm.num_groups
    size = mean = square_sum = None
    for top, bottom in _strips(height, strip_rows):
        rows = tensor[:, :, top:bottom].float().reshape(count, groups, -1)
        variance, strip_mean = (part.double() for part in torch.var_mean(rows, dim=2, correction=0))
        strip_size = rows.shape[2]
        if mean is None:
            size, mean, square_sum = strip_size, strip_mean, variance * strip_size
            continue
        delta = strip_mean - mean
        total = size + strip_size
        square_sum = square_sum + variance * strip_size + delta.square() * size * strip_size / total
        mean = mean + delta * strip_size / total
        size = total
    shape = (count, groups, 1, 1, 1)
    return mean.float().view(shape), torch.rsqrt(square_sum / size + norm.eps).float().view(shape)


def _group_norm_silu(rows: torch.Tensor, norm: torch.nn.GroupNorm, statistics) -> torch.Tensor:
    """SiLU(GroupNorm(rows)) for a strip of rows (N, C, h, W), with the whole tensor's ``statistics``
    (``_group_statistics``); computed in float32, returned in the strip's dtype."""
    mean, inverse_std = statistics
    count, channels, height, width = rows.shape
    grouped = rows.float().reshape(count, norm.num_groups, channels // norm.num_groups, height, width)
    normalised = ((grouped - mean) * inverse_std).reshape(count, channels, height, width)
    if norm.affine:
        normalised = normalised * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
    return torch.nn.functional.silu(normalised).to(rows.dtype)


def _resnet_in_strips(resnet, hidden: torch.Tensor, strip_rows: int) -> torch.Tensor:
    """A diffusers ResnetBlock2D without time embedding, strip by strip: (input + conv2(act(norm2(conv1(
    act(norm1(input))))))) / output_scale_factor. The result overwrites ``hidden`` (without a shortcut conv)
    or the block's own intermediate tensor (with one), so the block holds two tensors of the tile's size."""
    height = hidden.shape[-2]
    statistics = _group_statistics(hidden, resnet.norm1, strip_rows)
    inner = hidden.new_empty(hidden.shape[0], resnet.conv1.out_channels, height, hidden.shape[-1])
    for top, bottom in _strips(height, strip_rows):
        rows, pad = _rows_with_halo(hidden, top, bottom)
        inner[:, :, top:bottom] = _conv_rows(resnet.conv1, _group_norm_silu(rows, resnet.norm1, statistics), pad)
    statistics = _group_statistics(inner, resnet.norm2, strip_rows)
    # Each output strip needs the same strip of the input (the shortcut) and that strip of ``inner`` with a
    # one-row halo, so it can overwrite the input, or without a shortcut conv ``inner`` itself, top to
    # bottom, keeping the last original row of ``inner`` each strip overwrote for the next strip's halo.
    output = hidden if resnet.conv_shortcut is None else inner
    overwritten_row = None
    for top, bottom in _strips(height, strip_rows):
        rows, pad = _rows_with_halo(inner, top, bottom)
        if output is inner and overwritten_row is not None:
            rows = torch.cat([overwritten_row, rows[:, :, 1:]], dim=2)
        residual = _conv_rows(resnet.conv2, _group_norm_silu(rows, resnet.norm2, statistics), pad)
        shortcut = hidden[:, :, top:bottom]
        if resnet.conv_shortcut is not None:
            shortcut = resnet.conv_shortcut(shortcut)
        if output is inner:
            overwritten_row = inner[:, :, bottom - 1 : bottom].clone()
        output[:, :, top:bottom] = (shortcut + residual) / resnet.output_scale_factor
    return output


def _upsample_in_strips(upsampler, hidden: torch.Tensor, strip_rows: int) -> torch.Tensor:
    """A diffusers Upsample2D (nearest x2, then a 3x3 conv) strip by strip: (N, C, H, W) -> (N, C', 2H, 2W)."""
    count, _, height, width = hidden.shape
    output = hidden.new_empty(count, upsampler.conv.out_channels, 2 * height, 2 * width)
    for top, bottom in _strips(height, max(1, strip_rows // 2)):
        rows, _ = _rows_with_halo(hidden, top, bottom)
        first = max(top - 1, 0)
        upsampled = torch.nn.functional.interpolate(rows, scale_factor=2.0, mode="nearest")
        # Output rows 2·top-1 .. 2·bottom+1 (a one-row halo for the conv), as far as the image goes.
        start, stop = max(2 * top - 1, 0), min(2 * bottom + 1, 2 * height)
        upsampled = upsampled[:, :, start - 2 * first : stop - 2 * first]
        pad = (int(2 * top - 1 < 0), int(2 * bottom + 1 > 2 * height))
        output[:, :, 2 * top : 2 * bottom] = _conv_rows(upsampler.conv, upsampled, pad)
    return output
