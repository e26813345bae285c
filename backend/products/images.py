"""Image files: 8-bit sRGB PNG, float linear EXR and JSON, reading and writing, and the sRGB transfer function.

``read_panorama`` and ``read_equirect`` read a user's panorama (.png or .exr) with one-sentence errors; the
writers write one file at a path (``files.write_files_atomically`` decides which path). No torch: numpy,
Pillow and OpenEXR only.
"""

from __future__ import annotations

import json
import os

import numpy as np
import OpenEXR
from PIL import Image

from ..errors import BadRequest

FORMATS = {".exr": "EXR", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def srgb_to_linear(image: np.ndarray) -> np.ndarray:
    """Inverse sRGB transfer function (IEC 61966-2-1), elementwise; [0, 1] -> [0, 1] as float32."""
    image = image.astype(np.float32)
    return np.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(image: np.ndarray) -> np.ndarray:
    """sRGB transfer function (IEC 61966-2-1), elementwise, on values clipped to [0, 1]; float32 [0, 1]."""
    image = np.clip(image.astype(np.float32), 0.0, 1.0)
    return np.where(image <= 0.0031308, image * 12.92, 1.055 * image ** (1.0 / 2.4) - 0.055).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8, rounding as diffusers does."""
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_png(path: str, image: np.ndarray, compress_level: int = 6) -> None:
    """Write an (H, W, 3) float image in [0, 1] (sRGB-encoded) as an 8-bit PNG. ``compress_level`` 0-9 is zlib's
    (6, Pillow's default, for outputs; a preview takes 1: 3-4 times faster to write, a little larger)."""
    Image.fromarray(to_uint8(image), mode="RGB").save(path, format="PNG", compress_level=compress_level)


def write_exr(path: str, linear_rgb: np.ndarray, half: bool = False) -> None:
    """Write an (H, W, 3) scene-linear float image as a float32 (``half``: float16), ZIP-compressed scanline EXR.
    Values are written as they are (no clipping); half floats hold up to 65504."""
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    dtype = np.float16 if half else np.float32  # OpenEXR stores the channels in the array's own type
    with OpenEXR.File(header, {"RGB": np.ascontiguousarray(linear_rgb, dtype=dtype)}) as exr:
        exr.write(path)


def read_exr(path: str) -> np.ndarray:
    """Read the RGB channels of an EXR (one written by ``write_exr``, or any RGB / RGBA EXR, alpha
    dropped): (H, W, 3) float32. Raises ValueError when the file has no R, G and B channels."""
    with OpenEXR.File(path) as exr:
        channels = exr.channels()  # R, G, B (and A) come grouped as "RGB" or "RGBA"
        for name in ("RGB", "RGBA"):
            if name in channels:
                return np.asarray(channels[name].pixels[..., :3], dtype=np.float32)
    raise ValueError(f"{path} has no R, G and B channels (it has {', '.join(sorted(channels)) or 'none'})")


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented, key-sorted UTF-8 JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_panorama(path: str) -> np.ndarray:
    """Read an .exr (linear float RGB) or .png / .jpg (8-bit, as [0, 1] floats) panorama: (H, W, 3) float32.

    Raises BadRequest with one sentence when the file is missing, of another type or unreadable.
    """
    extension = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise BadRequest(f"The panorama {path} does not exist.")
    if extension not in FORMATS:
        raise BadRequest(f"The panorama {path} is not an .exr, .png or .jpg file.")
    try:
        if extension == ".exr":
            return read_exr(path)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as error:  # OpenEXR and Pillow raise assorted types for a damaged file
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise BadRequest(f"Could not read the panorama {path} as {FORMATS[extension]} ({reason}).") from None


def read_equirect(path: str) -> np.ndarray:
    """``read_panorama``, then check that the image is a 360° equirect (twice as wide as high): (H, 2H, 3) float32.

    Raises BadRequest with one sentence otherwise.
    """
    image = read_panorama(path)
    height, width = image.shape[:2]
    if width != 2 * height:
        raise BadRequest(f"The panorama is {width}x{height} px; a 360° equirectangular image is twice as wide as it is high.")
    return image


def read_start_image(path: str, exposure: float = 0.0) -> np.ndarray:
    """Read an image to start a generation from (``--init-image``, ``upscale``): (H, W, 3) float32 sRGB-encoded
    in [0, 1], the model's range. A .png or .jpg is read as it is; an .exr (scene-linear) is tone-mapped into
    that range the way ``hdr.make_hdr`` maps the model's image out of it, inverted: scaled by 2^-``exposure``
    (EV), clipped to [0, 1] and sRGB-encoded (the HDR step recovers the sun from the result). Raises
    BadRequest with one sentence when the file is missing, of another type or unreadable (``read_panorama``)."""
    image = read_panorama(path)
    if os.path.splitext(path)[1].lower() == ".exr":
        image = linear_to_srgb(image * np.float32(2.0 ** -exposure))
    return np.clip(image, 0.0, 1.0)

