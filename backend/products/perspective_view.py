"""``python -m backend view``: render a perspective view of an equirectangular panorama.

The view (yaw, pitch, roll, field of view in degrees; square, ``size`` px) follows the conventions of
``backend/sphere/geometry.py`` (``equirect_to_perspective``): yaw positive turns right, pitch positive looks
up, roll positive banks right (the scene turns counter-clockwise in the picture). An EXR panorama gives
a float32 linear EXR, its values untouched (HDR stays HDR); a PNG gives an 8-bit PNG, interpolated in
the file's own (sRGB-encoded) values as ``cubemap`` does. The file is written atomically
(``files.write_file_atomically``). No torch: numpy, Pillow and OpenEXR only.
"""

from __future__ import annotations

import math
import os

from ..errors import BadRequest
from ..sphere.geometry import equirect_to_perspective
from . import images
from .files import check_output_file, write_file_atomically

# The largest view we render (8192² px is 0.8 GB of float32 RGB); this only stops typos.
MAX_VIEW_SIZE = 8192


def render_view(panorama: str, out: str, yaw: float, pitch: float, fov: float, size: int, roll: float = 0.0,
                overwrite: bool = False) -> str:
    """Write the perspective view of the equirect image ``panorama`` (.exr or .png) to the file ``out``.

    ``out`` must have the panorama's extension (the same kind of file is written); its folder is created
    if needed. Angles in degrees, any finite values; ``fov`` in (0, 180); ``size`` in 1 … MAX_VIEW_SIZE.
    An existing ``out`` is replaced only with ``overwrite``. Returns the path written. Raises BadRequest
    (one sentence, nothing written) for bad input, SyncSphereError when writing fails.
    """
    panorama = os.path.abspath(os.path.expanduser(panorama))
    for name, value in (("--yaw", yaw), ("--pitch", pitch), ("--roll", roll), ("--fov", fov)):
        if not math.isfinite(value):
            raise BadRequest(f"{name} {value} is not a finite number of degrees.")
    if not 0.0 < fov < 180.0:
        raise BadRequest(f"--fov {fov:g} is not between 0 and 180 degrees (both excluded).")
    if not 1 <= size <= MAX_VIEW_SIZE:
        raise BadRequest(f"--size {size} is not between 1 and {MAX_VIEW_SIZE}.")
    image = images.read_equirect(panorama)
    extension = os.path.splitext(panorama)[1].lower()
    if os.path.splitext(out)[1].lower() != extension:
        raise BadRequest(f"The output {os.path.abspath(os.path.expanduser(out))} must be a {extension} file, "
                         "the panorama's own kind.")
    out = check_output_file(out, overwrite)

    view = equirect_to_perspective(image, yaw, pitch, roll, fov, size)
    write = images.write_exr if extension == ".exr" else images.write_png
    return write_file_atomically(out, lambda path: write(path, view))
