"""Sphere geometry: equirectangular pixels <-> view directions, and equirect -> cube map faces.

Plain numpy (no torch, no model). Conventions (design section 3):

- Equirect image of width W and height H (H = W/2 for a full sphere). Pixel coordinates are
  continuous ``(col, row)`` with integer values at pixel *centres*: column j is at longitude
  ``lon = (j + 0.5) / W * 2π − π`` and row i at latitude ``lat = π/2 − (i + 0.5) / H * π`` (the top row
  looks up). Longitude wraps: column W−1 is next to column 0, and no column is repeated.
- Longitude is the design's *yaw* (positive turns right) and latitude its *pitch* (positive looks up):
  yaw 0, pitch 0 looks at the image centre.
- 3D directions use py360convert's axes, so that our cube faces are oriented as its faces are:
  **x right, y up, z forward** (forward = yaw 0, pitch 0). Hence
  ``x = cos(lat) sin(lon)``, ``y = sin(lat)``, ``z = cos(lat) cos(lon)``; yaw +90° is +x.
  (These are image axes, not Blender's world axes: blender_addon/world.py says where the image centre
  lies in a Blender World.)
- Cube faces are named F R B L U D (front, right, back, left, up, down). F looks along +z, R along +x,
  B along −z, L along −x, U along +y, D along −y. Seen from the cube's centre, each side face (F R B L)
  has its top towards +y; U has its bottom row towards F and D its top row towards F. The ``dice`` and
  ``horizon`` layouts are py360convert's (``faces_to_dice``, ``faces_to_horizon``).

Pixel grid of a face: by default texel (i, j) of a face of size s samples the direction through the
centre of its square, ``(j + 0.5) / s`` across the face, which is how GPUs and Blender sample cube
maps. py360convert instead spreads its samples from edge to edge (``linspace(-0.5, 0.5, s)``: the first
and last texels lie *on* the cube's edges, so neighbouring faces repeat them); ``edge_aligned=True``
reproduces that grid exactly, which the tests use to compare with py360convert sample for sample.
"""

from __future__ import annotations

import numpy as np

FACES = ("F", "R", "B", "L", "U", "D")

# Where each face sits in py360convert's dice layout, in face units: (column, row) of a 4 x 3 grid.
#        U
#     L  F  R  B
#        D
DICE_CELLS = {"F": (1, 1), "R": (2, 1), "B": (3, 1), "L": (0, 1), "U": (1, 0), "D": (1, 2)}


def lonlat_to_direction(lon, lat) -> np.ndarray:
    """Unit view directions (..., 3) as (x right, y up, z forward) for longitudes/latitudes in radians.

    ``lon`` (yaw, positive to the right) and ``lat`` (pitch, positive up) broadcast together; any
    real values are accepted (longitude is periodic). Returns float64.
    """
    lon, lat = np.broadcast_arrays(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.sin(lon), np.sin(lat), cos_lat * np.cos(lon)], axis=-1)


def direction_to_lonlat(directions) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in radians of directions (..., 3) given as (x right, y up, z forward).

    The directions need not be unit length (only their direction counts); they must not be zero.
    Returns float64 arrays of shape (...): lon in [−π, π], lat in [−π/2, π/2]. Straight up or down
    has no longitude; it is reported as 0.
    """
    d = np.asarray(directions, np.float64)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    # atan2 of the horizontal length rather than asin(y): exact for any length and near the poles.
    return np.arctan2(x, z), np.arctan2(y, np.hypot(x, z))


def equirect_to_direction(col, row, width: int, height: int) -> np.ndarray:
    """Unit directions (..., 3) (x right, y up, z forward) through continuous equirect pixel coordinates.

    ``col``, ``row``: arrays (broadcast together) with integer values at pixel centres, as in the module
    docstring; ``width`` x ``height``: the image size in px. Column ``width / 2 − 0.5`` (between the two
    middle columns) and row ``height / 2 − 0.5`` look straight ahead (+z). Returns float64.
    """
    lon = (np.asarray(col, np.float64) + 0.5) / width * (2.0 * np.pi) - np.pi
    lat = np.pi / 2.0 - (np.asarray(row, np.float64) + 0.5) / height * np.pi
    return lonlat_to_direction(lon, lat)


def direction_to_equirect(directions, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous equirect pixel coordinates (col, row) of directions (..., 3) (x right, y up, z forward).

    The inverse of ``equirect_to_direction``: col in [−0.5, width − 0.5] (both ends are the same
    meridian, the seam behind the viewer), row in [−0.5, height − 0.5] (the poles). Returns float64
    arrays of shape (...).
    """
    lon, lat = direction_to_lonlat(directions)
    col = (lon + np.pi) / (2.0 * np.pi) * width - 0.5
    row = (np.pi / 2.0 - lat) / np.pi * height - 0.5
    return col, row


def cube_face_directions(face: str, size: int, *, edge_aligned: bool = False) -> np.ndarray:
    """Unit directions (size, size, 3), (x right, y up, z forward), of the texels of one cube face.

    ``face``: one of F R B L U D; ``size``: the face's width and height in px (>= 1). Element [i, j] is
    the direction of row i (top first) and column j (left first) of the face image, oriented as
    py360convert orients its faces (module docstring). ``edge_aligned=False`` (default): texel centres,
    ``(j + 0.5) / size`` across the face. ``edge_aligned=True``: py360convert's grid, edge to edge.
    Returns float64.
    """
    if face not in FACES:
        raise ValueError(f"Unknown cube face {face!r}; use one of {', '.join(FACES)}.")
    if int(size) != size or size < 1:
        raise ValueError(f"A cube face size must be a positive integer, not {size!r}.")
    if edge_aligned:
        steps = np.linspace(-0.5, 0.5, size)
    else:
        steps = (np.arange(size) + 0.5) / size - 0.5
    # a: across the face, left to right; b: up the face, top row first (so b decreases downwards).
    a, b = np.meshgrid(steps, -steps)
    half = np.full_like(a, 0.5)
    # The same table as py360convert's xyzcube, on a cube of side 1 centred on the viewer.
    x, y, z = {
        "F": (a, b, half),
        "R": (half, b, -a),
        "B": (-a, b, -half),
        "L": (-half, b, a),
        "U": (a, half, -b),
        "D": (a, -half, b),
    }[face]
    d = np.stack([x, y, z], axis=-1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def sample_equirect(image: np.ndarray, col, row) -> np.ndarray:
    """Bilinear samples of an equirect ``image`` (H, W, C) at continuous pixel coordinates (col, row).

    ``col``, ``row``: arrays of one shape (...), integer values at pixel centres. Longitude wraps:
    columns are taken modulo W, so between column W−1 and column 0 the image blends those two columns.
    Above the top row's centre (row < 0) the sample blends with the top row on the *other* side of the
    pole (longitude + 180°), and likewise below the bottom row: the sphere's neighbours, not a clamped
    edge. Returns (..., C) in float64.
    """
    h, w = image.shape[:2]
    col = np.asarray(col, np.float64)
    row = np.asarray(row, np.float64)
    top = np.floor(row)
    fy = (row - top)[..., None]
    top = top.astype(np.intp)
    result = 0.0
    for rows, weight in ((top, 1.0 - fy), (top + 1, fy)):
        # A row past a pole is the row mirrored across it, half a turn round in longitude.
        over_pole = (rows < 0) | (rows >= h)
        rows = np.clip(np.where(rows < 0, -1 - rows, np.where(rows >= h, 2 * h - 1 - rows, rows)), 0, h - 1)
        cols = np.where(over_pole, col + w / 2.0, col)
        left = np.floor(cols)
        fx = (cols - left)[..., None]
        left = left.astype(np.intp) % w  # floor-modulo: also right for negative columns
        right = (left + 1) % w
        result = result + weight * ((1.0 - fx) * image[rows, left] + fx * image[rows, right])
    return result


def equirect_to_cube_faces(image: np.ndarray, face_size: int, *, edge_aligned: bool = False) -> dict[str, np.ndarray]:
    """Cut an equirect image into the six faces of a cube map, sampling it bilinearly.

    ``image``: (H, W, C) float (any range: linear HDR values stay as they are), H = W/2 for a full
    sphere, conventions of the module docstring. ``face_size``: width and height of each face in px
    (W/4 keeps about the image's resolution at the face centres). ``edge_aligned``: see
    ``cube_face_directions`` (False: texel centres; True: py360convert's grid).
    Returns {face: (face_size, face_size, C) array} for the faces F R B L U D, in that order, in the
    image's float dtype (float32 for an integer image).
    """
    if image.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) image, got an array of shape {image.shape}.")
    h, w = image.shape[:2]
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32
    faces = {}
    for face in FACES:
        col, row = direction_to_equirect(cube_face_directions(face, face_size, edge_aligned=edge_aligned), w, h)
        faces[face] = sample_equirect(image, col, row).astype(dtype)
    return faces


def _check_faces(faces: dict[str, np.ndarray]) -> tuple[int, ...]:
    """Shape (s, s, C) shared by all six faces; raises ValueError if one is missing or differs."""
    missing = [face for face in FACES if face not in faces]
    if missing:
        raise ValueError(f"Cube face {missing[0]} is missing; a cube map needs {', '.join(FACES)}.")
    shape = faces["F"].shape
    if len(shape) != 3 or shape[0] != shape[1]:
        raise ValueError(f"Cube faces must be (s, s, C) arrays, face F is {shape}.")
    for face in FACES:
        if faces[face].shape != shape:
            raise ValueError(f"Face {face} is {faces[face].shape} but face F is {shape}.")
    return shape


def faces_to_dice(faces: dict[str, np.ndarray]) -> np.ndarray:
    """The cross ("dice") layout (3s, 4s, C) of six faces (s, s, C), as py360convert's ``cube_format="dice"``.

    Row 0 holds U above F; row 1 holds L F R B from left to right; row 2 holds D below F. The six
    unused cells are zero. Dtype: that of face F.
    """
    s, _, channels = _check_faces(faces)
    dice = np.zeros((3 * s, 4 * s, channels), dtype=faces["F"].dtype)
    for face, (cx, cy) in DICE_CELLS.items():
        dice[cy * s:(cy + 1) * s, cx * s:(cx + 1) * s] = faces[face]
    return dice


def faces_to_horizon(faces: dict[str, np.ndarray]) -> np.ndarray:
    """The six faces (s, s, C) side by side, F R B L U D: (s, 6s, C), py360convert's ``cube_format="horizon"``."""
    _check_faces(faces)
    return np.concatenate([faces[face] for face in FACES], axis=1)
