"""A generation job's files: panorama.png (8-bit sRGB), panorama.exr (float32 linear RGB), metadata.json, and for
360° (equirect) jobs the cube map (six faces, a dice cross and a horizon strip as PNG) and the HDR lighting
(``hdr.py``): panorama.exr is then the HDR image, with panorama_sky.exr and lighting.json beside it.

``job_output_names`` says which files a job may write (the request's --overwrite check reads it before any work
starts); ``write_job_outputs`` writes them all in one ``files.write_files_atomically``, which replaces the folder's
old set as a unit: a reader sees the old set or the complete new one, never a mix. While the job denoises,
``PreviewFile`` keeps its preview picture (``--preview-every``) in the folder, and removes it before those are written.
"""

from __future__ import annotations

import os

import numpy as np

from ..sphere.geometry import FACES
from . import images
from .cubemap import cube_map_writers, output_names as cube_map_names
from .files import write_file_atomically, write_files_atomically
from .hdr import HDR_OUTPUT_NAMES, hdr_writers

OUTPUT_NAMES = ("panorama.png", "panorama.exr", "metadata.json")
"""The files every job writes."""


def job_output_names(layout: str) -> list[str]:
    """The files a job of ``layout`` may write into its folder: ``OUTPUT_NAMES``, then for equirect jobs the HDR
    files panorama_sky.exr and lighting.json and the cube map's PNGs. An equirect job with --no-hdr lists the
    HDR files too: with --overwrite it removes them, so no stale lighting.json sits beside a new panorama."""
    names = list(OUTPUT_NAMES)
    if layout == "equirect":
        names += [name for name in HDR_OUTPUT_NAMES if name not in names]
        names += cube_map_names(".png", horizon=True)
    return names


def write_job_outputs(out_dir: str, image: np.ndarray, metadata: dict, cube_map: bool = False, hdr=None,
                      half: bool = False) -> dict:
    """Write panorama.png, panorama.exr and metadata.json for ``image`` (H, W, 3) in [0, 1], sRGB-encoded;
    with ``cube_map`` (360° equirect jobs) also its cube map as PNG: face_F … face_D, the cross
    cubemap_dice and the strip cubemap_horizon (``cubemap.cube_map_writers``, faces W/4 px).

    ``hdr``: a ``hdr.HdrResult`` of the image (equirect jobs without --no-hdr): panorama.exr is then its HDR
    image, and panorama_sky.exr and lighting.json are written too (``hdr.hdr_writers``); without it
    panorama.exr is the image's inverse sRGB, and an equirect job deletes the lighting files an earlier run
    left in the folder once the new files are in place. ``half``: half-float EXRs.

    The faces are cut with ``geometry.equirect_to_cube_faces`` from the PNG's own 8-bit pixels, so they are
    byte for byte what ``python -m backend cubemap panorama.png`` writes. Creates ``out_dir`` if needed;
    replaces the job files of an earlier run (the request checked ``--overwrite``) and keeps other entries.
    Returns {"png": path, "exr": path, "metadata": path}, plus with ``cube_map`` {"faces": {"F": path, …
    "D": path}, "dice": path, "horizon": path}, plus with ``hdr`` {"exr_sky": path, "lighting": path}: the
    ``outputs`` of the protocol's done event. All files are written in one ``write_files_atomically``: on
    any failure nothing is changed (SyncSphereError with one sentence for an OSError such as a full disk;
    BadRequest when another run holds the folder's lock).
    """
    if hdr is not None:
        writers = hdr_writers(hdr, half)  # panorama.exr (HDR), panorama_sky.exr, lighting.json
    else:
        writers = [("panorama.exr", lambda path: images.write_exr(path, images.srgb_to_linear(image), half=half))]
    writers += [
        ("panorama.png", lambda path: images.write_png(path, image)),
        ("metadata.json", lambda path: images.write_json(path, metadata)),
    ]
    cube_names = []
    if cube_map:
        cube_writers = cube_map_writers(images.to_uint8(image).astype(np.float32) / 255.0, ".png", horizon=True)
        cube_names = [name for name, _ in cube_writers]
        writers += cube_writers
    stale = list(HDR_OUTPUT_NAMES[1:]) if cube_map and hdr is None else []
    paths = write_files_atomically(out_dir, writers, remove=stale)
    outputs = {"png": paths["panorama.png"], "exr": paths["panorama.exr"], "metadata": paths["metadata.json"]}
    if hdr is not None:
        outputs["exr_sky"], outputs["lighting"] = paths["panorama_sky.exr"], paths["lighting.json"]
    if cube_map:
        # cube_map_writers' order: the faces F R B L U D, the cross, the strip.
        outputs["faces"] = {face: paths[name] for face, name in zip(FACES, cube_names)}
        outputs["dice"], outputs["horizon"] = paths[cube_names[6]], paths[cube_names[7]]
    return outputs


PREVIEW_NAME = ".syncsphere-preview.png"
"""The preview PNG in a job's output folder while it denoises (``PreviewFile``): hidden and named so that it cannot
be one of the user's files."""


class PreviewFile:
    """The job's preview picture, ``PREVIEW_NAME`` in its output folder ``out_dir``, while the job runs.

    ``write(image)`` replaces it atomically (``files.write_file_atomically``: a reader sees the previous picture
    or the new one, never half a PNG) and returns its absolute path, what the protocol's progress event carries
    as ``preview``. ``remove()`` deletes it, and the output folder too when writing the preview created it and it
    is empty again (a cancelled or failed job leaves nothing behind); the job calls it before writing its files,
    so a finished folder holds only the job's outputs. Usable as a context manager that removes on exit.
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(os.path.abspath(os.path.expanduser(out_dir)), PREVIEW_NAME)
        self.folder_existed = os.path.isdir(os.path.dirname(self.path))

    def write(self, image: np.ndarray) -> str:
        """Write ``image`` ((H, W, 3) float in [0, 1], sRGB-encoded) as the 8-bit preview PNG; returns its path.
        Raises SyncSphereError with one sentence when it cannot be written (a full disk)."""
        return write_file_atomically(self.path, lambda path: images.write_png(path, image, compress_level=1))

    def remove(self) -> None:
        """Delete the preview (and the folder it created, when empty); a missing one is fine."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        if not self.folder_existed:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:  # not empty (the user's or the job's files) or already gone: it stays as it is
                pass

    def __enter__(self) -> "PreviewFile":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False
