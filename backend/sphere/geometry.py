"""Sphere geometry: equirect pixels <-> directions <-> perspective view pixels <-> cube face texels.

Rendering an equirect's perspective views and cube faces, a cube map's equirect, and exact pixel
correspondences between views (and between views and the equirect) at any resolution. Plain numpy, no
model; torch only in ``sampling_grid``, which builds ``grid_sample`` grids. Conventions
(docs/conventions.md#directions):

- Equirect image of width W and height H (H = W/2 for a full sphere). Pixel coordinates are
  continuous ``(col, row)`` with integer values at pixel *centres*: column j is at longitude
  ``lon = (j + 0.5) / W * 2π − π`` and row i at latitude ``lat = π/2 − (i + 0.5) / H * π`` (the top row
  looks up). Longitude wraps: column W−1 is next to column 0, and no column is repeated.
- Longitude is the views' *yaw* (positive turns right) and latitude its *pitch* (positive looks up):
  yaw 0, pitch 0 looks at the image centre.
- 3D directions use py360convert's axes, so that our cube faces are oriented as its faces are:
  **x right, y up, z forward** (forward = yaw 0, pitch 0). Hence
  ``x = cos(lat) sin(lon)``, ``y = sin(lat)``, ``z = cos(lat) cos(lon)``; yaw +90° is +x.
  (These are image axes, not Blender's world axes: blender_addon/scene/world.py says where the image centre
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

Perspective views (square pinhole images) are given by yaw, pitch, roll and a field of view, in
**degrees** (as users and py360convert give them; positions on the sphere, ``lon``/``lat``, stay in
radians). The camera turns like an aircraft: yaw positive turns right, pitch positive looks up, roll
positive banks right, i.e. turns the camera *clockwise* about its viewing direction as seen by someone
looking through it, so the scene turns counter-clockwise in the picture (py360convert's ``in_rot_deg``
has the same sign). The camera's right, up and forward axes in world directions are the columns of
``camera_rotation(yaw, pitch, roll) = Ry(yaw) · Rx(−pitch) · Rz(−roll)`` (right-handed rotations about
the module's y, x and z axes): roll first, about the camera's own forward axis, then pitch, then yaw.
The field of view is horizontal, and vertical too since views are square; pixels sample their centres
by default (``edge_aligned=True``: py360convert's ``e2p`` grid, edge to edge). A cube face is exactly
the view with FOV 90° at its ``FACE_VIEWS`` yaw and pitch and roll 0 (that is how faces are computed).
With the pixel-centre grid a view of ``size`` px and the same view at ``size / 8`` (a VAE's latent)
cover the same square, latent pixel j covering image pixels 8j … 8j+7, so pixel correspondences can be
evaluated at every UNet feature resolution; py360convert's edge-to-edge grid has no such relation.

Cube map -> equirect (``cube_faces_to_equirect``) samples every equirect pixel centre, so unlike
py360convert's ``c2e`` (``linspace(−π, π, W)``) no column is repeated; c2e also reads face texel j at
``j / s`` across the face, half a texel off its own ``e2c`` grid and ours. Near a face's edge we
interpolate across it into the neighbouring face (``sample_cube_faces``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FACES = ("F", "R", "B", "L", "U", "D")

# Where each face sits in py360convert's dice layout, in face units: (column, row) of a 4 x 3 grid.
#        U
#     L  F  R  B
#        D
DICE_CELLS = {"F": (1, 1), "R": (2, 1), "B": (3, 1), "L": (0, 1), "U": (1, 0), "D": (1, 2)}

# (yaw, pitch) in degrees of the perspective view (FOV 90°, roll 0) that each cube face is.
FACE_VIEWS = {"F": (0.0, 0.0), "R": (90.0, 0.0), "B": (180.0, 0.0), "L": (-90.0, 0.0), "U": (0.0, 90.0), "D": (0.0, -90.0)}


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


def equirect_longitude(col, width: int, *, degrees: bool = False) -> np.ndarray:
    """Longitude of continuous equirect column coordinates ``col`` (array or number; integer values at pixel
    centres, as in the module docstring) on a canvas ``width`` px wide: (col + 0.5) / width · 2π − π, in
    [−π, π] for col in [−0.5, width − 0.5]; radians, or degrees (·360° − 180°) with ``degrees``. Float64."""
    turn = 360.0 if degrees else 2.0 * np.pi
    return (np.asarray(col, np.float64) + 0.5) / width * turn - turn / 2.0


def equirect_latitude(row, height: int, *, degrees: bool = False) -> np.ndarray:
    """Latitude of continuous equirect row coordinates ``row`` (integer values at pixel centres) on a canvas
    ``height`` px high: π/2 − (row + 0.5) / height · π, so row −0.5 is the north pole and height − 0.5 the
    south pole; radians, or degrees (90° − … · 180°) with ``degrees``. Float64."""
    half_turn = 180.0 if degrees else np.pi
    return half_turn / 2.0 - (np.asarray(row, np.float64) + 0.5) / height * half_turn


def equirect_to_direction(col, row, width: int, height: int) -> np.ndarray:
    """Unit directions (..., 3) (x right, y up, z forward) through continuous equirect pixel coordinates.

    ``col``, ``row``: arrays (broadcast together) with integer values at pixel centres, as in the module
    docstring; ``width`` x ``height``: the image size in px. Column ``width / 2 − 0.5`` (between the two
    middle columns) and row ``height / 2 − 0.5`` look straight ahead (+z). Returns float64.
    """
    return lonlat_to_direction(equirect_longitude(col, width), equirect_latitude(row, height))


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


# --- perspective views ------------------------------------------------------------------------------


def _cos_sin(degrees: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees; exact (0, ±1) at multiples of 90° so that cube faces are exact."""
    quarter = degrees / 90.0
    if math.isfinite(quarter) and quarter == round(quarter):
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(round(quarter)) % 4]
    radians = math.radians(degrees)
    return math.cos(radians), math.sin(radians)


def camera_rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """The (3, 3) float64 rotation from a view's camera axes to world directions (x right, y up, z forward).

    Angles in degrees, any real values: yaw positive turns right, pitch positive looks up, roll positive
    banks right (the camera turns clockwise about its viewing direction as seen through it; the scene
    turns counter-clockwise in the picture). Columns 0, 1, 2 are the camera's right, up and forward
    directions: ``Ry(yaw) @ Rx(−pitch) @ Rz(−roll)`` with right-handed rotation matrices. Yaw 0, pitch 0,
    roll 0 is the identity (looking at the equirect centre, +z). A world direction d has camera
    coordinates ``d @ R`` (R's transpose applied), in which the view looks along +z.
    """
    cy, sy = _cos_sin(yaw)
    cp, sp = _cos_sin(-pitch)
    cr, sr = _cos_sin(-roll)
    turn = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    bank = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return turn @ tilt @ bank


def _check_view(fov: float, size: int) -> float:
    """tan(fov / 2) after checking fov in (0, 180) degrees and size a positive integer; raises ValueError."""
    if not 0.0 < fov < 180.0:
        raise ValueError(f"A field of view must be between 0 and 180 degrees (exclusive), not {fov!r}.")
    if int(size) != size or size < 1:
        raise ValueError(f"A view size must be a positive integer, not {size!r}.")
    return 1.0 if fov == 90.0 else math.tan(math.radians(fov) / 2.0)


def _pixel_spacing(size: int, edge_aligned: bool) -> tuple[float, float]:
    """(pixels per unit of the image plane divided by tan(fov/2), pixel coordinate of the centre):
    col = (x / t) * scale + centre, row = −(y / t) * scale + centre."""
    if edge_aligned:  # py360convert: linspace(−t, t, size); a 1 px view looks at −t as linspace does
        return max(size - 1, 1) / 2.0, max(size - 1, 1) / 2.0
    return size / 2.0, (size - 1) / 2.0


def perspective_to_direction(col, row, yaw: float, pitch: float, roll: float, fov: float, size: int,
                             *, edge_aligned: bool = False) -> np.ndarray:
    """Unit directions (..., 3) (x right, y up, z forward) through continuous pixel coordinates of a view.

    ``col``, ``row``: arrays (broadcast together), integer values at pixel centres, column 0 on the left
    and row 0 at the top; any values (outside [−0.5, size − 0.5] they extend the image plane).
    ``yaw``, ``pitch``, ``roll``: degrees (module docstring); ``fov``: the horizontal (= vertical) field
    of view in degrees, in (0, 180); ``size``: the square view's width in px. Default grid: pixel j's
    centre lies ``(j + 0.5) / size`` across the view, so the view's outer pixel *edges* span the FOV.
    ``edge_aligned=True``: py360convert's ``e2p`` grid, pixel j at ``j / (size − 1)`` across, the outer
    pixel *centres* on the FOV's edges. Returns float64. Raises ValueError for a bad fov or size.
    """
    t = _check_view(fov, size)
    scale, centre = _pixel_spacing(size, edge_aligned)
    col, row = np.broadcast_arrays(np.asarray(col, np.float64), np.asarray(row, np.float64))
    x = (col - centre) / scale * t
    y = (centre - row) / scale * t
    d = np.stack([x, y, np.ones_like(x)], axis=-1) @ camera_rotation(yaw, pitch, roll).T
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def perspective_directions(yaw: float, pitch: float, roll: float, fov: float, size: int,
                           *, edge_aligned: bool = False) -> np.ndarray:
    """Unit directions (size, size, 3) (x right, y up, z forward) of the pixels of a perspective view.

    Element [i, j] is row i (top first), column j (left first); arguments as in
    ``perspective_to_direction`` (degrees; fov in (0, 180); pixel centres unless ``edge_aligned``).
    ``perspective_directions(*FACE_VIEWS[face], 0, 90, s)`` is ``cube_face_directions(face, s)``.
    Returns float64.
    """
    _check_view(fov, size)
    rows, cols = np.mgrid[0:size, 0:size]
    return perspective_to_direction(cols, rows, yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)


def direction_to_perspective(directions, yaw: float, pitch: float, roll: float, fov: float, size: int,
                             *, edge_aligned: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (col, row) in a perspective view of directions (..., 3), and which are in front.

    The inverse of ``perspective_to_direction`` (same arguments and grid). ``directions``: (x right,
    y up, z forward), any nonzero length. Returns float64 ``col``, ``row`` and bool ``in_front``, each of
    shape (...): ``in_front`` is True where the direction makes an acute angle with the view's forward
    axis (camera z > 0); there col/row are the central projection onto the image plane (any value:
    the view's own pixels are those with col and row in [−0.5, size − 0.5]), elsewhere they are NaN.
    """
    t = _check_view(fov, size)
    scale, centre = _pixel_spacing(size, edge_aligned)
    camera = np.asarray(directions, np.float64) @ camera_rotation(yaw, pitch, roll)
    depth = camera[..., 2]
    in_front = depth > 0
    safe = np.where(in_front, depth, 1.0)
    col = np.where(in_front, camera[..., 0] / safe / t * scale + centre, np.nan)
    row = np.where(in_front, centre - camera[..., 1] / safe / t * scale, np.nan)
    return col, row, in_front


@dataclass(frozen=True)
class PerspectiveView:
    """A square perspective view: yaw, pitch, roll and horizontal (= vertical) field of view in degrees.

    Conventions of the module docstring; its size in px is given where it is sampled, so that one view
    can be evaluated at the image resolution and at every UNet feature resolution.
    """

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    fov: float = 90.0

    def directions(self, size: int) -> np.ndarray:
        """Unit directions (size, size, 3) of the view's pixel centres (``perspective_directions``)."""
        return perspective_directions(self.yaw, self.pitch, self.roll, self.fov, size)

    def project(self, directions, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(col, row, in_front) of directions (..., 3) in this view at ``size`` px (``direction_to_perspective``)."""
        return direction_to_perspective(directions, self.yaw, self.pitch, self.roll, self.fov, size)


def _intrinsics(fov: float, size: int) -> np.ndarray:
    """The (3, 3) matrix K taking camera coordinates (x right, y up, z forward) to homogeneous pixel
    coordinates (col, row, 1) on the pixel-centre grid."""
    t = _check_view(fov, size)
    scale, centre = _pixel_spacing(size, False)
    return np.array([[scale / t, 0.0, centre], [0.0, -scale / t, centre], [0.0, 0.0, 1.0]])


def view_homography(view_a: PerspectiveView, view_b: PerspectiveView, size: int) -> np.ndarray:
    """The (3, 3) float64 homography taking homogeneous pixel coordinates of ``view_b`` to those of ``view_a``.

    Both views ``size`` px, pixel-centre grid. Views that share a centre differ by a pure rotation, so
    ``H = K_a · R_a^T · R_b · K_b^−1`` (MVDiffusion's correspondence; ``R`` = ``camera_rotation``, ``K``
    the pixel intrinsics). ``H @ (col_b, row_b, 1) = w · (col_a, row_a, 1)``, with ``w > 0`` exactly where
    the pixel's direction is in front of view a.
    """
    k_a, k_b = _intrinsics(view_a.fov, size), _intrinsics(view_b.fov, size)
    r_a = camera_rotation(view_a.yaw, view_a.pitch, view_a.roll)
    r_b = camera_rotation(view_b.yaw, view_b.pitch, view_b.roll)
    return k_a @ r_a.T @ r_b @ np.linalg.inv(k_b)


def view_correspondence(view_a: PerspectiveView, view_b: PerspectiveView, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pixel of ``view_b``, its continuous pixel coordinates in ``view_a``, and whether view a sees it.

    Both views at ``size`` px (any resolution: 512 for the image, 64, 32, 16, 8 for a VAE-factor-8
    UNet's feature maps; the pixel-centre grid makes them consistent). Returns float64 ``col``, ``row``
    and bool ``valid``, each (size, size), indexed [row, col] of view b: ``valid`` where the direction
    is in front of view a and falls on its image, col and row in [−0.5, size − 0.5]. col/row are NaN
    where the direction is not in front of view a, and outside that range where it misses view a's
    image. Computed with ``view_homography``; to sample view a there with ``torch.nn.functional.grid_sample``
    use ``sampling_grid(col, row, size, size, valid=valid)`` and ``padding_mode="border"`` (the outer
    half pixel then repeats the edge pixels).
    """
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    mapped = np.stack([cols, rows, np.ones_like(cols)], axis=-1) @ view_homography(view_a, view_b, size).T
    w = mapped[..., 2]
    in_front = w > 0
    safe = np.where(in_front, w, 1.0)
    col = np.where(in_front, mapped[..., 0] / safe, np.nan)
    row = np.where(in_front, mapped[..., 1] / safe, np.nan)
    with np.errstate(invalid="ignore"):
        valid = in_front & (col >= -0.5) & (col <= size - 0.5) & (row >= -0.5) & (row <= size - 0.5)
    return col, row, valid


def view_equirect_coordinates(view: PerspectiveView, size: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous equirect pixel coordinates (col, row), each (size, size), of a view's pixel centres.

    ``view`` at ``size`` px (image or latent resolution); the equirect canvas ``width`` x ``height`` at the
    same scale (e.g. a latent canvas W/8 x H/8 with a view at 512/8). Coordinates as
    ``direction_to_equirect``: col in [−0.5, width − 0.5], row in [−0.5, height − 0.5]. Sample with
    ``sample_equirect`` (numpy), or with ``grid_sample`` on a padded canvas: ``equirect_padding_indices`` and
    ``sampling_grid(col, row, width, height, pad=...)``.
    """
    return direction_to_equirect(view.directions(size), width, height)


def project_photo(photo: np.ndarray, fov: float, yaw: float, pitch: float, width: int, height: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A photo placed on an equirect canvas where a camera with horizontal field of view ``fov`` looking at
    (``yaw``, ``pitch``) saw it (degrees, roll 0; the module's conventions): (pixels, inside).

    ``photo``: (h, w, C) float, any w x h (not only square): it is the middle h rows of the square view of w px
    at that ``fov`` (pixel-centre grid), so its pixels stay square and the vertical field of view follows from
    its aspect. ``width`` x ``height``: the equirect's size in px. Returns ``pixels`` (height, width, C) float32,
    the photo sampled bilinearly at every equirect pixel centre in front of the camera (beyond the photo's border
    its edge pixels repeat), NaN behind the camera; and ``inside`` (height, width) bool, the pixels whose centre
    falls on the photo (col in [-0.5, w - 0.5], row in [-0.5, h - 0.5]). Works in blocks of rows, so memory
    stays bounded for large canvases. Raises ValueError for a fov outside (0, 180) or an image not (h, w, C).
    """
    if photo.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) photo, got an array of shape {photo.shape}.")
    photo_height, photo_width = photo.shape[:2]
    view = PerspectiveView(yaw, pitch, 0.0, fov)
    offset = (photo_width - photo_height) / 2.0  # the photo's rows within the square view of its width
    stack = np.asarray(photo, np.float64)[None]
    pixels = np.zeros((height, width, photo.shape[2]), np.float32)
    inside = np.zeros((height, width), bool)
    block = max(1, (1 << 18) // width)
    for start in range(0, height, block):
        rows, cols = np.mgrid[start:min(start + block, height), 0:width]
        col, row, in_front = view.project(equirect_to_direction(cols, rows, width, height), photo_width)
        row = row - offset
        with np.errstate(invalid="ignore"):
            inside[start:start + block] = (in_front & (col >= -0.5) & (col <= photo_width - 0.5)
                                           & (row >= -0.5) & (row <= photo_height - 0.5))
        sampled = _bilinear_clamped(stack, 0, np.nan_to_num(col), np.nan_to_num(row))
        pixels[start:start + block] = np.where(in_front[..., None], sampled, np.nan)
    return pixels, inside


def equirect_to_perspective(image: np.ndarray, yaw: float, pitch: float, roll: float, fov: float, size: int,
                            *, edge_aligned: bool = False) -> np.ndarray:
    """Render a perspective view of an equirect ``image`` (H, W, C), sampling it bilinearly (``sample_equirect``).

    View arguments as ``perspective_directions`` (degrees; fov in (0, 180); ``size`` px square; pixel
    centres unless ``edge_aligned``, which reproduces py360convert's ``e2p(image, fov, yaw, pitch,
    (size, size), in_rot_deg=roll)``). Longitude wraps and samples past a pole come from across it.
    Any value range (linear HDR stays as it is). Returns (size, size, C) in the image's float dtype
    (float32 for an integer image). Works in blocks of rows, so memory stays bounded for large views.
    """
    if image.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) image, got an array of shape {image.shape}.")
    _check_view(fov, size)
    h, w = image.shape[:2]
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32
    view = np.empty((size, size, image.shape[2]), dtype)
    block = max(1, (1 << 18) // size)
    for start in range(0, size, block):
        rows, cols = np.mgrid[start:min(start + block, size), 0:size]
        directions = perspective_to_direction(cols, rows, yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)
        view[start:start + block] = sample_equirect(image, *direction_to_equirect(directions, w, h))
    return view


def cube_face_directions(face: str, size: int, *, edge_aligned: bool = False) -> np.ndarray:
    """Unit directions (size, size, 3), (x right, y up, z forward), of the texels of one cube face.

    ``face``: one of F R B L U D; ``size``: the face's width and height in px (>= 1). Element [i, j] is
    the direction of row i (top first) and column j (left first) of the face image, oriented as
    py360convert orients its faces (module docstring). ``edge_aligned=False`` (default): texel centres,
    ``(j + 0.5) / size`` across the face. ``edge_aligned=True``: py360convert's grid, edge to edge.
    A face is the perspective view with FOV 90° at ``FACE_VIEWS[face]`` (roll 0), and is computed as one.
    Returns float64.
    """
    if face not in FACES:
        raise ValueError(f"Unknown cube face {face!r}; use one of {', '.join(FACES)}.")
    if int(size) != size or size < 1:
        raise ValueError(f"A cube face size must be a positive integer, not {size!r}.")
    return perspective_directions(*FACE_VIEWS[face], 0.0, 90.0, size, edge_aligned=edge_aligned)


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


# --- cube map -> directions and equirect ------------------------------------------------------------------

# Which face a direction's largest component points at: (axis, positive?) -> face.
_MAJOR_AXIS_FACES = {(0, True): "R", (0, False): "L", (1, True): "U", (1, False): "D", (2, True): "F", (2, False): "B"}


def direction_to_cube_face(directions, size: int, *, edge_aligned: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cube face each direction (..., 3) (x right, y up, z forward) meets, and where on it.

    ``size``: the faces' width in px; ``edge_aligned`` as in ``cube_face_directions``, whose inverse this
    is. Returns ``face`` (intp indices into ``FACES``), ``col``, ``row`` (float64 continuous texel
    coordinates, integer at texel centres, in [−0.5, size − 0.5] on the default grid), each of shape (...).
    The face is the one along the direction's largest component; on a cube edge (a tie) either face's
    coordinates name the same point. Directions must be nonzero.
    """
    d = np.asarray(directions, np.float64)
    axis = np.argmax(np.abs(d), axis=-1)
    positive = np.take_along_axis(d, axis[..., None], axis=-1)[..., 0] > 0
    face = np.zeros(axis.shape, np.intp)
    col = np.zeros(axis.shape)
    row = np.zeros(axis.shape)
    for (major, sign), name in _MAJOR_AXIS_FACES.items():
        mask = (axis == major) & (positive == sign)
        face[mask] = FACES.index(name)
        col[mask], row[mask], _ = direction_to_perspective(d[mask], *FACE_VIEWS[name], 0.0, 90.0, size,
                                                           edge_aligned=edge_aligned)
    return face, col, row


def _bilinear_clamped(stack: np.ndarray, index, col, row) -> np.ndarray:
    """Bilinear samples (..., C) of images stack[index] (N, h, w, C) at (col, row), clamped to the texel centres."""
    h, w = stack.shape[1:3]
    col = np.clip(np.asarray(col, np.float64), 0, w - 1)
    row = np.clip(np.asarray(row, np.float64), 0, h - 1)
    left = np.minimum(np.floor(col).astype(np.intp), max(w - 2, 0))
    top = np.minimum(np.floor(row).astype(np.intp), max(h - 2, 0))
    fx, fy = (col - left)[..., None], (row - top)[..., None]
    right, bottom = np.minimum(left + 1, w - 1), np.minimum(top + 1, h - 1)
    upper = (1 - fx) * stack[index, top, left] + fx * stack[index, top, right]
    lower = (1 - fx) * stack[index, bottom, left] + fx * stack[index, bottom, right]
    return (1 - fy) * upper + fy * lower


def _faces_with_borders(faces: dict[str, np.ndarray]) -> np.ndarray:
    """The six faces F R B L U D as one (6, s + 2, s + 2, C) float64 stack, each with a one-texel border
    taken from its neighbours: the border texel at (col, row) ∈ {−1, s} is the neighbouring face sampled
    bilinearly in the direction of that texel's centre (the face's plane extended), clamped to the
    neighbour's outer texel centres (which moves it by at most 1 / (2 (s + 1)) texel)."""
    s = _check_faces(faces)[0]
    stack = np.stack([np.asarray(faces[face], np.float64) for face in FACES])
    padded = np.zeros((6, s + 2, s + 2, stack.shape[3]))
    padded[:, 1:-1, 1:-1] = stack
    ring = np.zeros((s + 2, s + 2), bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    rows, cols = np.nonzero(ring)
    for index, face in enumerate(FACES):
        directions = perspective_to_direction(cols - 1, rows - 1, *FACE_VIEWS[face], 0.0, 90.0, s)
        neighbour, col, row = direction_to_cube_face(directions, s)
        padded[index, rows, cols] = _bilinear_clamped(stack, neighbour, col, row)
    return padded


def sample_cube_faces(faces: dict[str, np.ndarray], directions) -> np.ndarray:
    """Bilinear samples (..., C), float64, of a cube map in directions (..., 3) (x right, y up, z forward).

    ``faces``: {face: (s, s, C)} for F R B L U D, oriented as ``cube_face_directions`` (texel-centre
    grid). Inside a face this is plain bilinear interpolation between texel centres; within half a texel
    of a face's edge it interpolates towards the neighbouring face's texels across the edge (a border
    of texels sampled from the neighbours, ``_faces_with_borders``), so there is no seam at cube edges or
    at the poles and no clamped edge.
    """
    return _sample_bordered_faces(_faces_with_borders(faces), directions)


def _sample_bordered_faces(padded: np.ndarray, directions) -> np.ndarray:
    """``sample_cube_faces`` on the stack ``_faces_with_borders`` made."""
    face, col, row = direction_to_cube_face(directions, padded.shape[1] - 2)
    return _bilinear_clamped(padded, face, col + 1, row + 1)


def cube_faces_to_equirect(faces: dict[str, np.ndarray], width: int) -> np.ndarray:
    """The equirect image (width / 2, width, C) of a cube map, sampling the faces bilinearly (``sample_cube_faces``).

    ``faces``: {face: (s, s, C)} for F R B L U D (``equirect_to_cube_faces``' orientation); ``width``: an
    even number of px >= 2. Pixel (i, j) samples the direction of its centre (docs/conventions.md#directions): no
    column is repeated, column W−1 being next to column 0. (py360convert's ``c2e`` instead samples
    ``linspace(−π, π, W)`` by ``linspace(π/2, −π/2, H)``: its first and last columns are the same meridian
    and its first and last rows the poles themselves.) Dtype: the faces' float dtype (float32 for integers).
    Works in blocks of rows, so memory stays bounded for large images.
    """
    if int(width) != width or width < 2 or width % 2:
        raise ValueError(f"An equirect width must be an even number of px >= 2, not {width!r}.")
    padded = _faces_with_borders(faces)
    dtype = faces["F"].dtype if np.issubdtype(faces["F"].dtype, np.floating) else np.float32
    height = width // 2
    image = np.empty((height, width, padded.shape[3]), dtype)
    block = max(1, (1 << 18) // width)
    for start in range(0, height, block):
        rows, cols = np.mgrid[start:min(start + block, height), 0:width]
        image[start:start + block] = _sample_bordered_faces(padded, equirect_to_direction(cols, rows, width, height))
    return image


# --- sampling grids for torch.nn.functional.grid_sample ---------------------------------------------------


def equirect_padding_indices(height: int, width: int, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (rows, cols), each (height + 2 pad, width + 2 pad) intp, that pad an equirect image by ``pad`` px.

    ``image[..., rows, cols]`` (numpy, or torch with ``torch.as_tensor``) surrounds an (…, H, W) image with
    its neighbours on the sphere, as ``sample_equirect`` sees them: columns wrap in longitude, and a row
    past a pole is the row mirrored across it, half a turn round (``width`` must then be even).
    ``0 <= pad <= height``.
    """
    if not 0 <= pad <= height:
        raise ValueError(f"An equirect padding must be between 0 and the height {height}, not {pad!r}.")
    if pad and width % 2:
        raise ValueError(f"Padding across the poles needs an even width, not {width}.")
    image_rows = np.arange(-pad, height + pad)[:, None]
    image_cols = np.arange(-pad, width + pad)[None, :]
    over_pole = (image_rows < 0) | (image_rows >= height)
    rows = np.where(image_rows < 0, -1 - image_rows, np.where(image_rows >= height, 2 * height - 1 - image_rows, image_rows))
    cols = np.where(over_pole, image_cols + width // 2, image_cols) % width
    shape = (height + 2 * pad, width + 2 * pad)
    return np.broadcast_to(rows, shape).astype(np.intp), np.broadcast_to(cols, shape).astype(np.intp)


def sampling_grid(col, row, width: int, height: int, *, pad: int = 0, valid=None):
    """A ``torch.nn.functional.grid_sample`` grid (..., 2), float32 (x, y), for continuous pixel coordinates.

    ``col``, ``row``: arrays (...) with integer values at pixel centres, in an image ``width`` x ``height``
    px; ``pad``: the px the sampled image was padded by on every side (``equirect_padding_indices``). The
    grid is normalised for ``align_corners=False``: x = (2 (col + pad) + 1) / (width + 2 pad) − 1, and
    likewise y. Where ``valid`` is False or a coordinate is NaN the grid holds −2, outside the image, so
    ``padding_mode="zeros"`` gives 0 there. Add a batch axis (``grid[None]``) for ``grid_sample``.
    """
    import torch

    col = np.asarray(col, np.float64)
    row = np.asarray(row, np.float64)
    x = (2.0 * (col + pad) + 1.0) / (width + 2 * pad) - 1.0
    y = (2.0 * (row + pad) + 1.0) / (height + 2 * pad) - 1.0
    keep = np.isfinite(x) & np.isfinite(y)
    if valid is not None:
        keep &= np.asarray(valid, bool)
    grid = np.where(keep[..., None], np.stack([x, y], axis=-1), -2.0)
    return torch.from_numpy(grid.astype(np.float32))
