"""``python -m backend cubemap``: cut an equirectangular panorama into cube map files.

Writes ``face_F`` ``face_R`` ``face_B`` ``face_L`` ``face_U`` ``face_D`` and the cross ``cubemap_dice``
(py360convert's faces and layout, ``backend/sphere/geometry.py``) into one folder, all at once
(``files.write_files_atomically``). ``cube_map_writers`` is the one way to make these files: an equirect
generation job writes them too (as PNG, with the ``cubemap_horizon`` strip), in the same atomic write as
its panorama (``outputs.write_job_outputs``). An EXR panorama gives float32 linear EXRs, its values untouched
(HDR stays HDR); a PNG gives 8-bit PNGs, interpolated in the file's own (sRGB-encoded) values as other
image tools do. No torch: numpy, Pillow and OpenEXR only.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BadRequest, SyncSphereError
from ..sphere.geometry import FACES, equirect_to_cube_faces, faces_to_dice, faces_to_horizon
from . import images
from .files import check_output_folder, write_files_atomically

# The largest face we write: a 16384 px equirect's W/4 is 4096; this only stops typos.
MAX_FACE_SIZE = 16384


def output_names(extension: str, horizon: bool = False) -> list[str]:
    """The file names of a cube map, for ``extension`` ".exr" or ".png": faces F R B L U D, then the cross,
    then (``horizon``) the strip. The ``cubemap`` command writes the faces and the cross; a job, all of them."""
    names = [f"face_{face}{extension}" for face in FACES] + [f"cubemap_dice{extension}"]
    return names + [f"cubemap_horizon{extension}"] if horizon else names


def cube_map_writers(image: np.ndarray, extension: str, face_size: int | None = None,
                     horizon: bool = False) -> list[tuple[str, object]]:
    """The cube map of the equirect ``image`` as (file name, write(path)) pairs for ``files.write_files_atomically``.

    ``image``: (H, 2H, 3) float; for ".exr" scene-linear values (written untouched), for ".png" sRGB-encoded
    values in [0, 1] (written as 8 bits). ``face_size``: px per face side (default: the width / 4).
    ``horizon``: also the strip F R B L U D (``faces_to_horizon``). The faces are cut here, before anything
    is written; the pairs come in the order of ``output_names(extension, horizon)``.
    """
    faces = equirect_to_cube_faces(image, face_size or max(1, image.shape[1] // 4))
    pictures = [faces[face] for face in FACES] + [faces_to_dice(faces)] + ([faces_to_horizon(faces)] if horizon else [])
    write = images.write_exr if extension == ".exr" else images.write_png
    # The default argument binds each lambda to its own image (a plain closure would see the last one).
    return [(name, lambda path, image=image: write(path, image))
            for name, image in zip(output_names(extension, horizon), pictures)]


def write_cubemap(panorama: str, out: str, face_size: int | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write the cube map files of the equirect image ``panorama`` (.exr or .png) into the folder ``out``.

    ``face_size``: width and height of each face in px (default: the panorama's width / 4, which keeps
    its resolution at the face centres). Existing files of the same names are replaced only with
    ``overwrite``. Creates ``out`` if needed. Returns {file name: path} in the order of ``output_names``.
    Raises BadRequest (one sentence, nothing written) for bad input, SyncSphereError when writing fails.
    """
    panorama = os.path.abspath(os.path.expanduser(panorama))
    extension = os.path.splitext(panorama)[1].lower()
    if face_size is not None and not 1 <= face_size <= MAX_FACE_SIZE:
        raise BadRequest(f"--face-size {face_size} is not between 1 and {MAX_FACE_SIZE}.")
    out = check_output_folder(out, output_names(extension), overwrite)
    image = images.read_equirect(panorama)

    writers = cube_map_writers(image, extension, face_size)
    try:
        return write_files_atomically(out, writers)
    except OSError as error:
        raise SyncSphereError(f"Could not write the cube map into {out} ({error.strerror or error}).") from None
