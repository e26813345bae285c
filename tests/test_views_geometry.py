"""Perspective views, cube map -> equirect, correspondences between views, and ``python -m backend view``
(backend/sphere/geometry.py, backend/products/perspective_view.py). numpy only (torch for the grid_sample grids); fast."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.app.cli import main
from backend.sphere.geometry import (
    FACE_VIEWS,
    FACES,
    PerspectiveView,
    camera_rotation,
    cube_face_directions,
    cube_faces_to_equirect,
    direction_to_cube_face,
    direction_to_equirect,
    direction_to_lonlat,
    direction_to_perspective,
    equirect_padding_indices,
    equirect_to_cube_faces,
    equirect_to_direction,
    equirect_to_perspective,
    lonlat_to_direction,
    perspective_directions,
    perspective_to_direction,
    sample_cube_faces,
    sample_equirect,
    sampling_grid,
    view_correspondence,
    view_equirect_coordinates,
    view_homography,
)
from backend.products.images import read_exr, write_exr, write_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (yaw, pitch, roll, fov, size): straight ahead, a general view, one across the seam and below the
# horizon, one over the zenith, one next to the nadir, a wide and a narrow one.
VIEWS = [(0, 0, 0, 90, 64), (30, 20, 15, 70, 50), (-150, -60, -40, 120, 37), (179, 85, 90, 60, 33),
         (45, -89, 10, 100, 40), (-100, 10, -170, 150, 32), (60, 40, 0, 20, 24)]


@pytest.fixture
def py360convert():
    """The reference implementation (requirements-dev.txt); only the tests comparing with it need it."""
    return pytest.importorskip("py360convert")


def noise(shape, seed=0):
    """White noise in [0, 1): every misplaced sample shows."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def on_sphere(directions, seed=0):
    """A random function of the direction (..., 3) -> (..., 3) in [0, 1], smooth on the whole sphere
    (poles included, unlike waves in longitude and latitude): waves along a few random directions,
    about 3 cycles round the sphere."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(8, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    phases = rng.random((8, 3)) * 2 * np.pi
    along = np.asarray(directions, np.float64) @ axes.T  # (..., 8)
    return 0.5 + np.cos(3 * along[..., :, None] + phases).sum(axis=-2) / 16


def equirect_of(function, height, width):
    """An equirect image (H, W, 3) holding ``function(direction)`` at its pixel centres."""
    rows, cols = np.mgrid[0:height, 0:width]
    return function(equirect_to_direction(cols, rows, width, height))


def random_directions(count, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(count, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


# --- conventions -------------------------------------------------------------------------------------------


def test_view_axes_follow_design_section_3():
    """Yaw positive turns right (+x), pitch positive looks up (+y), yaw 0 pitch 0 looks at the image
    centre (+z); roll positive banks right: the view's right edge dips and its top leans right."""
    np.testing.assert_array_equal(camera_rotation(0, 0, 0), np.eye(3))
    for yaw, pitch, roll in [(0, 0, 0), (90, 0, 0), (-90, 0, 0), (0, 90, 0), (37, -21, 55), (-170, 80, -120)]:
        rotation = camera_rotation(yaw, pitch, roll)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-15)
        assert np.linalg.det(rotation) == pytest.approx(1)
        centre = perspective_directions(yaw, pitch, roll, 90, 5)[2, 2]  # odd size: the middle pixel
        np.testing.assert_allclose(centre, rotation[:, 2], atol=1e-15)
        np.testing.assert_allclose(centre, lonlat_to_direction(np.radians(yaw), np.radians(pitch)), atol=1e-12)
    np.testing.assert_allclose(perspective_directions(90, 0, 0, 90, 5)[2, 2], [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(perspective_directions(0, 90, 0, 90, 5)[2, 2], [0, 1, 0], atol=1e-15)
    # Not mirrored: the top-right pixel looks right and up.
    top_right = perspective_directions(0, 0, 0, 60, 5)[0, -1]
    assert top_right[0] > 0 and top_right[1] > 0
    # Roll +30: the camera turns clockwise as seen through it, so its right edge looks below the
    # horizon and its top edge right of the meridian (and the scene turns counter-clockwise in the picture).
    view = perspective_directions(0, 0, 30, 90, 5)
    assert view[2, -1, 1] < 0 and view[0, 2, 0] > 0
    lon, lat = direction_to_lonlat(view[2, -1])
    assert np.degrees(np.arctan2(np.tan(lat), np.sin(lon))) == pytest.approx(-30)  # tilted by exactly 30°


@pytest.mark.parametrize("edge_aligned", [False, True])
def test_perspective_round_trips_to_float_precision(edge_aligned):
    directions = random_directions(4000)
    for yaw, pitch, roll, fov, size in VIEWS:
        col, row, in_front = direction_to_perspective(directions, yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)
        forward = camera_rotation(yaw, pitch, roll)[:, 2]
        np.testing.assert_array_equal(in_front, directions @ forward > 0)
        assert np.isnan(col[~in_front]).all() and np.isnan(row[~in_front]).all()
        back = perspective_to_direction(col[in_front], row[in_front], yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)
        # Directions near 90° off axis project far out on the image plane; atan-like loss of precision.
        steep = np.abs(directions[in_front] @ forward) > 0.05
        np.testing.assert_allclose(back[steep], directions[in_front][steep], atol=1e-9)

        pixels = perspective_directions(yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)
        assert pixels.shape == (size, size, 3)
        np.testing.assert_allclose(np.linalg.norm(pixels, axis=-1), 1, atol=1e-12)
        col, row, in_front = direction_to_perspective(pixels, yaw, pitch, roll, fov, size, edge_aligned=edge_aligned)
        rows, cols = np.mgrid[0:size, 0:size]
        assert in_front.all()
        np.testing.assert_allclose(col, cols, atol=1e-9)
        np.testing.assert_allclose(row, rows, atol=1e-9)


def test_pixel_grids_and_field_of_view():
    """Pixel-centre grid: the outer pixel *edges* lie on the field of view; edge-aligned: the outer
    pixel *centres* (py360convert's linspace)."""
    size, fov = 8, 70
    half = np.radians(fov) / 2
    edge = perspective_to_direction(-0.5, (size - 1) / 2, 0, 0, 0, fov, size)
    assert np.arctan2(-edge[0], edge[2]) == pytest.approx(half)
    outer = perspective_directions(0, 0, 0, fov, size, edge_aligned=True)
    assert np.arctan2(outer[3, -1, 0], outer[3, -1, 2]) == pytest.approx(half)  # the last column's centre
    assert outer[0, 3, 1] / outer[0, 3, 2] == pytest.approx(np.tan(half))
    for bad in (0, 180, -10, 200):
        with pytest.raises(ValueError, match="field of view"):
            perspective_directions(0, 0, 0, bad, 4)
    with pytest.raises(ValueError, match="view size"):
        perspective_directions(0, 0, 0, 90, 0)


# --- cube faces are views ---------------------------------------------------------------------------------


def test_cube_faces_are_fov_90_views_with_py360convert_orientation(py360convert):
    """A face equals the FOV 90° view at its FACE_VIEWS yaw/pitch, on both grids; on the edge-aligned grid
    the faces are py360convert's ``xyzcube`` table, and on the texel-centre grid the same table at centres."""
    from py360convert.utils import xyzcube

    size = 7
    table = xyzcube(size).astype(np.float64)  # (s, 6s, 3), faces F R B L U D side by side, edge to edge
    steps = (np.arange(size) + 0.5) / size - 0.5
    a, b = np.meshgrid(steps, -steps)
    half = np.full_like(a, 0.5)
    centred = {"F": (a, b, half), "R": (half, b, -a), "B": (-a, b, -half), "L": (-half, b, a),
               "U": (a, half, -b), "D": (a, -half, b)}  # py360convert's table, written out at texel centres
    for index, face in enumerate(FACES):
        yaw, pitch = FACE_VIEWS[face]
        for edge_aligned in (False, True):
            np.testing.assert_allclose(perspective_directions(yaw, pitch, 0, 90, size, edge_aligned=edge_aligned),
                                       cube_face_directions(face, size, edge_aligned=edge_aligned), atol=1e-15)
        theirs = table[:, index * size:(index + 1) * size]
        np.testing.assert_allclose(cube_face_directions(face, size, edge_aligned=True),
                                   theirs / np.linalg.norm(theirs, axis=-1, keepdims=True), atol=1e-7)
        expected = np.stack(centred[face], axis=-1)
        np.testing.assert_allclose(cube_face_directions(face, size), expected / np.linalg.norm(expected, axis=-1, keepdims=True),
                                   atol=1e-15)


def test_views_at_fov_90_render_the_cube_faces():
    image = noise((64, 128, 3), seed=1).astype(np.float64)
    faces = equirect_to_cube_faces(image, 24)
    for face in FACES:
        view = equirect_to_perspective(image, *FACE_VIEWS[face], 0, 90, 24)
        np.testing.assert_allclose(view, faces[face], atol=1e-12, err_msg=face)


@pytest.mark.parametrize("edge_aligned", [False, True])
def test_direction_to_cube_face_inverts_cube_face_directions(edge_aligned):
    size = 9
    rows, cols = np.mgrid[0:size, 0:size]
    for index, face in enumerate(FACES):
        found, col, row = direction_to_cube_face(cube_face_directions(face, size, edge_aligned=edge_aligned), size,
                                                 edge_aligned=edge_aligned)
        inner = slice(1, -1) if edge_aligned else slice(None)  # edge-aligned rims lie on the cube's edges: ties
        assert (found[inner, inner] == index).all(), face
        np.testing.assert_allclose(col[inner, inner], cols[inner, inner], atol=1e-9)
        np.testing.assert_allclose(row[inner, inner], rows[inner, inner], atol=1e-9)
    # Every direction lands inside the face it is assigned to.
    face, col, row = direction_to_cube_face(random_directions(5000, seed=2), size)
    assert col.min() >= -0.5 - 1e-9 and col.max() <= size - 0.5 + 1e-9 and row.min() >= -0.5 - 1e-9 and row.max() <= size - 0.5 + 1e-9


# --- agreement with py360convert ----------------------------------------------------------------------


@pytest.mark.parametrize("yaw,pitch,roll,fov,size", VIEWS)
def test_edge_aligned_views_equal_py360convert_e2p(yaw, pitch, roll, fov, size, py360convert):
    """With py360convert's pixel grid, our view is ``e2p(image, fov, yaw, pitch, (size, size), in_rot_deg=roll)``
    sample for sample: same yaw/pitch signs, same roll sign, same seam and poles.

    Measured on white noise (128 x 256; py360convert 1.0.4, scipy's map_coordinates order 1, no cv2): mean
    |diff| about 1.2e-6, max 8e-6 to 1.4e-5 (py360convert's float32 coordinates). A mirrored roll or a one-pixel
    shift gives differences of order 0.3.
    """
    image = noise((128, 256, 3), seed=5)
    ours = equirect_to_perspective(image, yaw, pitch, roll, fov, size, edge_aligned=True)
    theirs = py360convert.e2p(image, fov, yaw, pitch, (size, size), in_rot_deg=roll, mode="bilinear")
    assert ours.shape == theirs.shape == (size, size, 3) and ours.dtype == np.float32
    difference = np.abs(ours - theirs)
    assert difference.mean() < 1e-5 and difference.max() < 2e-4, (difference.mean(), difference.max())


def test_pixel_centred_views_agree_with_e2p_on_smooth_images(py360convert):
    """Our default grid samples pixel centres; e2p's runs edge to edge (a scale of (s − 1)/s about the
    centre, up to half a pixel at the rim). Compared on an image smooth on the sphere.

    Measured (256 x 512): mean |diff| 0.0007 to 0.0025, max 0.004 to 0.008 over VIEWS; on white noise the
    two grids differ by 0.13 to 0.2 on average.
    """
    image = equirect_of(on_sphere, 256, 512).astype(np.float32)
    for yaw, pitch, roll, fov, size in VIEWS:
        ours = equirect_to_perspective(image, yaw, pitch, roll, fov, size)
        theirs = py360convert.e2p(image, fov, yaw, pitch, (size, size), in_rot_deg=roll, mode="bilinear")
        difference = np.abs(ours - theirs)
        assert difference.mean() < 0.005 and difference.max() < 0.02, (yaw, pitch, difference.mean(), difference.max())


def c2e_grid_directions(height, width):
    """The directions py360convert's ``c2e`` samples: ``linspace(−π, π, W)`` by ``linspace(π/2, −π/2, H)``."""
    lon, lat = np.meshgrid(np.linspace(-np.pi, np.pi, width), np.linspace(np.pi / 2, -np.pi / 2, height))
    return lonlat_to_direction(lon, lat)


def test_cube_to_equirect_differs_from_c2e_only_by_its_grid(py360convert):
    """py360convert's ``c2e`` repeats the seam column (its first and last columns are both longitude ±180°)
    and its first and last rows are the poles themselves; ours samples pixel centres (docs/conventions.md#directions):
    no repeated column, W−1 next to 0. Sampled on c2e's own grid, ours agrees with c2e on smooth faces.

    c2e also reads face texel j at ``j / s`` across the face instead of ``(j + 0.5) / s`` (half a texel
    off). Measured with faces holding a linear function of the direction (s = 64, 256 x 512): c2e's error
    against that function is mean 0.019, max 0.047; ours at the same directions mean 1.2e-4, max 7.3e-4.
    """
    height, width, size = 128, 256, 32
    random_faces = {face: noise((size, size, 3), seed=index) for index, face in enumerate(FACES)}
    theirs = py360convert.c2e(random_faces, height, width, mode="bilinear", cube_format="dict")
    ours = cube_faces_to_equirect(random_faces, width)
    assert ours.shape == theirs.shape == (height, width, 3) and ours.dtype == np.float32
    assert np.abs(theirs[:, 0] - theirs[:, -1]).max() < 1e-5  # c2e: the seam column twice
    assert np.ptp(theirs[0], axis=0).max() == 0  # c2e: the top row is one point, the zenith
    assert np.abs(ours[:, 0] - ours[:, -1]).mean() > 0.05  # ours: two different meridians
    rows, cols = np.mgrid[0:height, 0:width]
    np.testing.assert_allclose(ours, sample_cube_faces(random_faces, equirect_to_direction(cols, rows, width, height)), atol=1e-6)

    weights = np.array([1.0, 2.0, 3.0])
    linear = {face: cube_face_directions(face, 64) * weights for face in FACES}
    directions = c2e_grid_directions(256, 512)
    ours = sample_cube_faces(linear, directions)
    theirs = py360convert.c2e({f: v.astype(np.float32) for f, v in linear.items()}, 256, 512, mode="bilinear", cube_format="dict")
    ours_error, their_error = np.abs(ours - directions * weights), np.abs(theirs - directions * weights)
    assert ours_error.max() < 1e-3 and their_error.mean() > 0.01, (ours_error.max(), their_error.mean())

    smooth_faces = {face: on_sphere(cube_face_directions(face, 64)).astype(np.float32) for face in FACES}
    difference = np.abs(sample_cube_faces(smooth_faces, directions) - py360convert.c2e(smooth_faces, 256, 512, cube_format="dict"))
    # Measured: mean 0.0035, max 0.012 (c2e's half texel on a function with ~3 cycles round the sphere).
    assert difference.mean() < 0.007 and difference.max() < 0.025, (difference.mean(), difference.max())


def test_cube_edges_are_interpolated_across_into_the_neighbouring_face():
    """Faces holding a linear function of their texel directions: every equirect pixel (seam, poles, cube
    edges and corners included) gets that function of its direction, to bilinear interpolation's error.

    Measured (256 x 512): max error 7.3e-4 with 64 px faces, 3.4e-3 with 37 px; clamping at each face's
    outer texel centres instead of reading across the edge gives 0.017 and 0.031.
    """
    weights = np.array([1.0, 2.0, 3.0])
    expected = equirect_of(lambda d: d * weights, 256, 512)
    for size, tolerance in ((64, 1e-3), (37, 4e-3)):
        faces = {face: cube_face_directions(face, size) * weights for face in FACES}
        error = np.abs(cube_faces_to_equirect(faces, 512) - expected)
        assert error.max() < tolerance, (size, error.max())


def test_equirect_to_cube_to_equirect_round_trips_on_a_smooth_image():
    """e2c then c2e (ours) on an image smooth on the sphere returns it, poles and seam included.

    Measured (128 x 256, 64 px faces): mean 7.2e-5, max 4.5e-4; max 2.0e-4 on the top and bottom rows and
    3.4e-4 on the seam columns.
    """
    image = equirect_of(on_sphere, 128, 256)
    back = cube_faces_to_equirect(equirect_to_cube_faces(image, 64), 256)
    error = np.abs(back - image)
    assert error.mean() < 2e-4 and error.max() < 1.5e-3, (error.mean(), error.max())
    assert error[[0, -1]].max() < 1e-3 and error[:, [0, -1]].max() < 1e-3


def test_cube_to_equirect_input_checks():
    faces = {face: np.zeros((4, 4, 1), np.uint8) for face in FACES}
    assert cube_faces_to_equirect(faces, 8).dtype == np.float32
    with pytest.raises(ValueError, match="even number"):
        cube_faces_to_equirect(faces, 7)
    with pytest.raises(ValueError, match="D is missing"):
        cube_faces_to_equirect({face: faces[face] for face in "FRBLU"}, 8)


# --- correspondences between views ----------------------------------------------------------------------


def through_the_equirect(view_a, view_b, size, scale=1):
    """View b's pixel (at ``scale`` times ``size``, centres of ``scale`` x ``scale`` blocks) -> direction ->
    equirect coordinates -> direction -> view a's pixel, scaled back to ``size``: the long way round."""
    big = size * scale
    rows, cols = np.mgrid[0:size, 0:size] * scale + (scale - 1) / 2  # a block's centre at the big resolution
    directions = perspective_to_direction(cols, rows, view_b.yaw, view_b.pitch, view_b.roll, view_b.fov, big)
    col, row = direction_to_equirect(directions, 8 * big, 4 * big)
    col, row, in_front = view_a.project(equirect_to_direction(col, row, 8 * big, 4 * big), big)
    return (col + 0.5) / scale - 0.5, (row + 0.5) / scale - 0.5, in_front


PAIRS = [
    (PerspectiveView(0, 0, 0, 90), PerspectiveView(40, 15, 10, 80)),  # neighbours on the horizon
    (PerspectiveView(170, 30, 0, 90), PerspectiveView(-150, 45, -20, 100)),  # across the seam
    (PerspectiveView(0, 60, 0, 90), PerspectiveView(90, 80, 0, 90)),  # round the zenith
]


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_correspondences_agree_with_going_through_the_equirect_at_every_feature_resolution(pair):
    """The homography K_a R_a^T R_b K_b^-1 equals mapping view b's pixel through the sphere, at 512 px's
    UNet feature sizes 64, 32, 16, 8; and a latent pixel's correspondence is that of the centre of the
    image block it covers (the pixel-centre grid makes the resolutions agree)."""
    view_a, view_b = PAIRS[pair]
    for size in (64, 32, 16, 8):
        col, row, valid = view_correspondence(view_a, view_b, size)
        assert col.shape == row.shape == valid.shape == (size, size)
        expected_col, expected_row, in_front = through_the_equirect(view_a, view_b, size)
        np.testing.assert_array_equal(np.isnan(col), ~in_front)
        np.testing.assert_allclose(col[in_front], expected_col[in_front], atol=1e-9)
        np.testing.assert_allclose(row[in_front], expected_row[in_front], atol=1e-9)
        inside = in_front & (np.abs(expected_col - (size - 1) / 2) <= size / 2) & (np.abs(expected_row - (size - 1) / 2) <= size / 2)
        np.testing.assert_array_equal(valid, inside)
        assert 0 < valid.sum() < size * size  # the views overlap, partly
        # The same correspondences from the 512 px view's pixels, at the centres of 512/size blocks.
        scaled_col, scaled_row, _ = through_the_equirect(view_a, view_b, size, scale=512 // size)
        np.testing.assert_allclose(col[in_front], scaled_col[in_front], atol=1e-9)
        np.testing.assert_allclose(row[in_front], scaled_row[in_front], atol=1e-9)


def test_correspondences_of_views_facing_apart_and_of_a_view_with_itself():
    col, row, valid = view_correspondence(PerspectiveView(0, 0), PerspectiveView(180, 0), 16)
    assert not valid.any() and np.isnan(col).all() and np.isnan(row).all()
    view = PerspectiveView(33, -12, 7, 75)
    col, row, valid = view_correspondence(view, view, 16)
    rows, cols = np.mgrid[0:16, 0:16]
    assert valid.all()
    np.testing.assert_allclose(col, cols, atol=1e-12)
    np.testing.assert_allclose(row, rows, atol=1e-12)
    np.testing.assert_allclose(view_homography(view, view, 16), np.eye(3), atol=1e-12)


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_sampling_view_a_at_the_correspondences_renders_view_b(pair):
    """grid_sample of view a's image at view b's correspondences (sampling_grid) gives view b's image where
    view a sees it: the correspondences and the grid normalisation agree with the renderer.

    Direction-coded panorama (256 x 512), 64 px views. Measured: max 1.2e-4 where the correspondence lies
    between view a's pixel centres (two bilinear resamplings); up to 0.004 in the outer half pixel, which
    ``padding_mode="border"`` extends flat. The grid read with ``align_corners=True`` gives 0.003 to 0.004
    inside, shifted by half a pixel 0.008.
    """
    import torch
    import torch.nn.functional as F

    panorama = equirect_of(direction_colours, 256, 512)
    view_a, view_b = PAIRS[pair]
    image_a = equirect_to_perspective(panorama, view_a.yaw, view_a.pitch, view_a.roll, view_a.fov, 64)
    image_b = equirect_to_perspective(panorama, view_b.yaw, view_b.pitch, view_b.roll, view_b.fov, 64)
    col, row, valid = view_correspondence(view_a, view_b, 64)
    grid = sampling_grid(col, row, 64, 64, valid=valid)
    assert grid.shape == (64, 64, 2) and grid.dtype == torch.float32
    assert (grid[torch.from_numpy(~valid)] == -2).all()
    warped = F.grid_sample(torch.from_numpy(image_a).permute(2, 0, 1)[None], grid[None].double(), mode="bilinear",
                           padding_mode="border", align_corners=False)[0].permute(1, 2, 0).numpy()
    error = np.abs(warped - image_b)
    inner = valid & (col >= 0) & (col <= 63) & (row >= 0) & (row <= 63)
    assert error[inner].max() < 5e-4 and error[valid].max() < 0.01, (error[inner].max(), error[valid].max())


@pytest.mark.parametrize("pad", [1, 2])
def test_equirect_grid_sample_equals_sample_equirect_across_the_seam_and_the_poles(pad):
    """A view's equirect coordinates as a grid_sample grid on a canvas padded by equirect_padding_indices
    reproduce sample_equirect (numpy), wrap and poles included: the engine can warp latents with it."""
    import torch
    import torch.nn.functional as F

    height, width = 16, 32  # a latent canvas
    canvas = noise((height, width, 4), seed=7).astype(np.float64)
    rows, cols = equirect_padding_indices(height, width, pad)
    assert rows.shape == cols.shape == (height + 2 * pad, width + 2 * pad)
    padded = torch.from_numpy(canvas).permute(2, 0, 1)[:, torch.as_tensor(rows), torch.as_tensor(cols)]
    for view in (PerspectiveView(175, 20, 10, 90), PerspectiveView(-30, 75, 0, 100), PerspectiveView(90, -80, 45, 120)):
        col, row = view_equirect_coordinates(view, 8, width, height)
        expected = sample_equirect(canvas, col, row)
        np.testing.assert_allclose(expected, equirect_to_perspective(canvas, view.yaw, view.pitch, view.roll, view.fov, 8),
                                   atol=1e-12)
        grid = sampling_grid(col, row, width, height, pad=pad)
        sampled = F.grid_sample(padded[None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                                align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(sampled, expected, atol=1e-5)


# --- python -m backend view ----------------------------------------------------------------------------


def direction_colours(directions):
    """RGB = (x + 1) / 2, (y + 1) / 2, (z + 1) / 2: a colour that encodes the direction."""
    return (np.asarray(directions) + 1) / 2


def decode(colours):
    d = 2 * np.asarray(colours, np.float64) - 1
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def view(capsys, *args):
    """Run ``main(["view", *args])``; returns (exit code, stderr)."""
    code = main(["view", *map(str, args)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("yaw,pitch,roll,fov", [(0, 0, 0, 90), (135, 30, 20, 70), (-170, -75, -60, 110), (20, 88, 0, 60)])
def test_view_renders_the_directions_a_direction_coded_panorama_encodes(tmp_path, capsys, yaw, pitch, roll, fov):
    """An EXR panorama whose colour is its pixel's direction: the rendered view's colours decode to the
    view's own pixel directions (yaw right, pitch up, roll banking right, seam and poles), to bilinear
    interpolation's error (measured: max 3.8e-5 rad at 128 x 256; py360convert's edge-to-edge pixel grid
    instead gives 0.021, a mirrored roll 0.47 to 1.5)."""
    panorama = tmp_path / "directions.exr"
    write_exr(str(panorama), equirect_of(direction_colours, 128, 256))
    out = tmp_path / "views" / "view.exr"
    code, message = view(capsys, panorama, "--yaw", yaw, "--pitch", pitch, "--roll", roll, "--fov", fov, "--size", 24, "--out", out)
    assert code == 0 and str(out) in message, message
    assert sorted(os.listdir(out.parent)) == ["view.exr"]  # no partial files
    rendered = read_exr(str(out))
    assert rendered.shape == (24, 24, 3)
    error = np.linalg.norm(decode(rendered) - perspective_directions(yaw, pitch, roll, fov, 24), axis=-1)
    assert error.max() < 5e-4, error.max()


def test_view_of_a_png_is_an_8_bit_png_and_replaces_only_with_overwrite(tmp_path, capsys):
    panorama = tmp_path / "directions.png"
    write_png(str(panorama), equirect_of(direction_colours, 128, 256))
    out = tmp_path / "view.png"
    code, message = view(capsys, panorama, "--yaw", -60, "--pitch", 10, "--fov", 80, "--size", 20, "--out", out)
    assert code == 0, message
    rendered = np.asarray(Image.open(out))
    assert rendered.shape == (20, 20, 3) and rendered.dtype == np.uint8
    stored = np.asarray(Image.open(panorama), np.float32) / 255
    np.testing.assert_allclose(rendered / 255, equirect_to_perspective(stored, -60, 10, 0, 80, 20), atol=0.5 / 255 + 1e-6)
    error = np.linalg.norm(decode(rendered / 255) - perspective_directions(-60, 10, 0, 80, 20), axis=-1)
    assert error.max() < 0.02, error.max()  # 8-bit quantisation

    code, message = view(capsys, panorama, "--yaw", 0, "--pitch", 0, "--fov", 80, "--size", 10, "--out", out)
    assert code == 2 and "--overwrite" in message and np.asarray(Image.open(out)).shape == (20, 20, 3)
    code, message = view(capsys, panorama, "--yaw", 0, "--pitch", 0, "--fov", 80, "--size", 10, "--out", out, "--overwrite")
    assert code == 0 and np.asarray(Image.open(out)).shape == (10, 10, 3)


def test_view_runs_as_a_module(tmp_path):
    write_exr(str(tmp_path / "p.exr"), noise((8, 16, 3)))
    result = subprocess.run([sys.executable, "-m", "backend", "view", str(tmp_path / "p.exr"), "--yaw", "10", "--pitch", "-5",
                             "--roll", "3", "--fov", "90", "--size", "6", "--out", str(tmp_path / "v.exr")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    assert read_exr(str(tmp_path / "v.exr")).shape == (6, 6, 3) and "v.exr" in result.stderr


def _panorama(tmp_path):
    write_exr(str(tmp_path / "p.exr"), noise((8, 16, 3)))
    return tmp_path / "p.exr"


def _square(tmp_path):
    write_exr(str(tmp_path / "square.exr"), noise((16, 16, 3)))
    return tmp_path / "square.exr"


def _existing_output(tmp_path):
    (tmp_path / "out.exr").write_text("keep me")
    return _panorama(tmp_path)


VIEW_ARGS = {"--yaw": "0", "--pitch": "0", "--fov": "90", "--size": "8"}

BAD_VIEWS = {
    "missing": (lambda tmp: tmp / "missing.exr", {}, "does not exist"),
    "not 2:1": (_square, {}, "twice as wide as it is high"),
    "fov 0": (_panorama, {"--fov": "0"}, "--fov 0 is not between 0 and 180"),
    "fov 180": (_panorama, {"--fov": "180"}, "--fov 180 is not between 0 and 180"),
    "fov negative": (_panorama, {"--fov": "-30"}, "--fov -30 is not between 0 and 180"),
    "size 0": (_panorama, {"--size": "0"}, "--size 0 is not between 1 and 8192"),
    "size huge": (_panorama, {"--size": "100000"}, "--size 100000 is not between 1 and 8192"),
    "yaw nan": (_panorama, {"--yaw": "nan"}, "--yaw nan is not a finite number"),
    "fov missing": (_panorama, {"--fov": None}, "arguments are required: --fov"),
    "size not a number": (_panorama, {"--size": "big"}, "invalid int value"),
    "existing output": (_existing_output, {}, "already exists; pass --overwrite"),
    "other kind": (_panorama, {"--out": "out.png"}, "must be a .exr file"),
    "output a folder": (_panorama, {"--out": "folder.exr"}, "is a folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_VIEWS))
def test_view_bad_input_is_one_sentence_exit_2_and_writes_nothing(tmp_path, capsys, case):
    make, changes, expected = BAD_VIEWS[case]
    panorama = make(tmp_path)
    (tmp_path / "folder.exr").mkdir()
    options = {**VIEW_ARGS, "--out": "out.exr", **changes}
    options["--out"] = str(tmp_path / options["--out"])
    before = sorted(os.listdir(tmp_path))
    arguments = [str(panorama)] + [item for name, value in options.items() if value is not None for item in (name, value)]
    try:
        code, message = view(capsys, *arguments)
    except SystemExit as exit:  # argparse's own errors exit from parse_args
        code, message = exit.code, capsys.readouterr().err.strip()
    assert code == 2 and expected in message, message
    assert len(message.splitlines()) == 1 and message.startswith("error: ") and message.endswith("."), message
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing replaced
    if case == "existing output":
        assert (tmp_path / "out.exr").read_text() == "keep me"


def test_view_failure_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    import backend.products.images

    def full_disk(path, image):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    panorama = _panorama(tmp_path)
    monkeypatch.setattr(backend.products.images, "write_exr", full_disk)
    code, message = view(capsys, panorama, "--yaw", 0, "--pitch", 0, "--fov", 90, "--size", 4, "--out", tmp_path / "new" / "v.exr")
    assert code == 1 and "No space left on device" in message and len(message.splitlines()) == 1, message
    assert not (tmp_path / "new").exists()  # the partial file and the folder this call created are gone
