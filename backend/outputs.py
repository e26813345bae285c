"""Writing a job's files: panorama.png (8-bit sRGB), panorama.exr (float32 linear RGB), metadata.json, and for
360° (equirect) jobs the cube map: six faces, a dice cross and a horizon strip as PNG, and the HDR lighting
(``backend/hdr.py``): panorama.exr is then the HDR image, with panorama_sky.exr and lighting.json beside it.

Every file is first written in full to a hidden partial file in the output folder and then renamed into
place (a rename within a folder is atomic), so a job that fails or is killed while writing never leaves a
half-written ``panorama.png``. Partial files of a killed run are removed by the next run in that folder.
``write_files_atomically`` does this for any set of files (the cube map export uses it too).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import OpenEXR
from PIL import Image

PARTIAL_MARK = ".partial-"


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


def write_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) float image in [0, 1] (sRGB-encoded) as an 8-bit PNG."""
    Image.fromarray(to_uint8(image), mode="RGB").save(path, format="PNG")


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


def write_job_outputs(out_dir: str, image: np.ndarray, metadata: dict, cube_map: bool = False, hdr=None,
                      half: bool = False, remove: Sequence[str] = ()) -> dict:
    """Write panorama.png, panorama.exr and metadata.json for ``image`` (H, W, 3) in [0, 1], sRGB-encoded;
    with ``cube_map`` (360° equirect jobs) also its cube map as PNG: face_F … face_D, the cross
    cubemap_dice and the strip cubemap_horizon (``cubemap.cube_map_writers``, faces W/4 px).

    ``hdr``: a ``hdr.HdrResult`` of the image (equirect jobs without --no-hdr): panorama.exr is then its HDR
    image, and panorama_sky.exr and lighting.json are written too (``hdr.hdr_writers``); without it
    panorama.exr is the image's inverse sRGB. ``half``: half-float EXRs. ``remove``: names of files from an
    earlier run to delete once the new ones are in place (an equirect --no-hdr job's stale lighting files).

    The faces are cut with ``geometry.equirect_to_cube_faces`` from the PNG's own 8-bit pixels, so they are
    byte for byte what ``python -m backend cubemap panorama.png`` writes. Creates ``out_dir`` if needed;
    replaces existing files (the request checked ``--overwrite``). Returns {"png": path, "exr": path,
    "metadata": path}, plus with ``cube_map`` {"faces": {"F": path, … "D": path}, "dice": path,
    "horizon": path}, plus with ``hdr`` {"exr_sky": path, "lighting": path}: the ``outputs`` of the
    protocol's done event. All files are written in one ``write_files_atomically``: on any failure nothing
    new is left behind.
    """
    # Lambdas look the writers up when called, so tests can replace them on this module.
    if hdr is not None:
        from .hdr import hdr_writers

        writers = hdr_writers(hdr, half)  # panorama.exr (HDR), panorama_sky.exr, lighting.json
    else:
        writers = [("panorama.exr", lambda path: write_exr(path, srgb_to_linear(image), half=half))]
    writers += [
        ("panorama.png", lambda path: write_png(path, image)),
        ("metadata.json", lambda path: write_json(path, metadata)),
    ]
    cube_names = []
    if cube_map:
        from .cubemap import cube_map_writers

        cube_writers = cube_map_writers(to_uint8(image).astype(np.float32) / 255.0, ".png", horizon=True)
        cube_names = [name for name, _ in cube_writers]
        writers += cube_writers
    paths = write_files_atomically(out_dir, writers, remove=remove)
    outputs = {"png": paths["panorama.png"], "exr": paths["panorama.exr"], "metadata": paths["metadata.json"]}
    if hdr is not None:
        outputs["exr_sky"], outputs["lighting"] = paths["panorama_sky.exr"], paths["lighting.json"]
    if cube_map:
        from .geometry import FACES

        # cube_map_writers' order: the faces F R B L U D, the cross, the strip.
        outputs["faces"] = {face: paths[name] for face, name in zip(FACES, cube_names)}
        outputs["dice"], outputs["horizon"] = paths[cube_names[6]], paths[cube_names[7]]
    return outputs


def write_files_atomically(out_dir: str, writers: Sequence[tuple[str, Callable[[str], None]]],
                           remove: Sequence[str] = ()) -> dict[str, str]:
    """Write several files into ``out_dir`` so that none of them is ever seen half-written.

    ``writers``: (file name, write) pairs, ``write(path)`` writing the whole file at ``path``. Each is
    written to a hidden partial file ``.NAME.partial-PID`` first; only when all are written are they
    renamed into place (a rename within a folder is atomic), replacing files of the same name.
    Creates ``out_dir`` if needed and first removes partial files a killed run left there. On any
    failure the partial files are removed, and a folder this call created is removed again, before the
    exception propagates. ``remove``: names of files in ``out_dir`` to delete after the renames (files an
    earlier run wrote that this one replaces by nothing); missing ones are fine. Returns {file name: path}.
    """
    created_folder = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_partial_files(out_dir)
    partial_paths = []
    try:
        for name, write in writers:
            partial = os.path.join(out_dir, f".{name}{PARTIAL_MARK}{os.getpid()}")
            partial_paths.append((partial, os.path.join(out_dir, name)))
            write(partial)
        for partial, final in partial_paths:
            os.replace(partial, final)
        for name in remove:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    except BaseException:
        for partial, _ in partial_paths:
            if os.path.exists(partial):
                os.remove(partial)
        if created_folder and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return {name: os.path.join(out_dir, name) for name, _ in writers}


def remove_partial_files(out_dir: str) -> None:
    """Delete partial files left in ``out_dir`` by a run that was killed while writing."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), f".*{PARTIAL_MARK}*")):
        os.remove(path)
