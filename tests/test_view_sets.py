"""View sets of an equirect canvas (backend/sphere/view_sets.py): names, coverage, where the projected views look,
and their grid_sample grids. numpy/torch only, no model; fast."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.sphere.geometry import FACE_VIEWS, PerspectiveView, equirect_padding_indices, equirect_to_direction
from backend.request import VIEW_SETS, parse_view_set
from backend.sphere.view_sets import GRID_PAD, band_rows, build_view_set, canvas_coverage, projected_view_grid

# (canvas height, width, window = view size, stride): a 64-latent window on a 2048 x 1024 px panorama
# (four 90° faces round, the faces' resolution), and the same geometry at half the scale.
SIZES = [(128, 256, 64, 8), (64, 128, 32, 4)]


def read_views(canvas, views, size):
    """grid_sample each view (PerspectiveView) from ``canvas`` (1, C, H, W) as the engine will: (N, C, size, size)."""
    h, w = canvas.shape[-2:]
    rows, cols = equirect_padding_indices(h, w, GRID_PAD)
    padded = canvas[..., torch.as_tensor(rows), torch.as_tensor(cols)]
    grid = torch.stack([projected_view_grid(view, size, h, w) for view in views]).to(canvas.dtype)
    return F.grid_sample(padded.expand(len(views), -1, -1, -1), grid, mode="bilinear", align_corners=False)


def direction_canvas(h, w):
    """A canvas (1, 3, H, W) float64 whose pixels hold their centre's direction (x right, y up, z forward)."""
    rows, cols = np.mgrid[0:h, 0:w]
    return torch.from_numpy(equirect_to_direction(cols, rows, w, h)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", VIEW_SETS)
@pytest.mark.parametrize("height,width,window,stride", SIZES)
def test_every_canvas_pixel_is_seen(name, height, width, window, stride):
    views = build_view_set(name, height, width, window, stride)
    coverage = canvas_coverage(views, height, width, window)
    assert coverage.shape == (height, width)
    assert coverage.min() >= 1


@pytest.mark.parametrize("name", ["band", "cube", "ring"])
def test_every_pixel_is_seen_on_the_default_canvas(name):
    # The default 1024 x 512 px panorama: a 128 x 64 latent canvas with 64-latent views (faces oversampled 2x).
    views = build_view_set(name, 64, 128, 64, 8)
    assert canvas_coverage(views, 64, 128, 64).min() >= 1


@pytest.mark.parametrize("height,width,window,stride", SIZES)
def test_cube_faces_see_each_pixel_once_away_from_their_edges(height, width, window, stride):
    coverage = canvas_coverage(build_view_set("cube", height, width, window, stride), height, width, window)
    # Only pixel centres on a face edge (none at these sizes) could be seen twice.
    assert torch.all(coverage == 1)


def test_view_set_contents():
    cube = build_view_set("cube", 128, 256, 64, 8)
    assert [label for label, _ in cube.projected] == ["F", "R", "B", "L", "U", "D"] and not cube.crops
    for label, view in cube.projected:
        assert (view.yaw, view.pitch, view.roll, view.fov) == (*FACE_VIEWS[label], 0.0, 90.0)
    ring = build_view_set("ring", 128, 256, 64, 8)
    assert [label for label, _ in ring.projected] == [
        "yaw0", "yaw45", "yaw90", "yaw135", "yaw180", "yaw-135", "yaw-90", "yaw-45", "U", "D"]
    assert all(view.pitch == 0 and view.fov == 90 for _, view in ring.projected[:8])
    band = build_view_set("band", 64, 128, 64, 8)
    assert band.crops and not band.projected and {view.top for view in band.crops} == {0}
    poles = build_view_set("band+poles", 128, 256, 64, 8)
    assert [label for label, _ in poles.projected] == ["U", "D"]
    # Rows between ±60°, rounded outward: 21 .. 107 (86 rows); windows every 8 rows and one at the far edge.
    assert band_rows(128) == (21, 107)
    assert sorted({view.top for view in poles.crops}) == [21, 29, 37, 43]
    assert {view.left for view in poles.crops} == set(range(0, 256, 8))
    # At the 45° limit a canvas twice the window high holds exactly one row of windows, between ±45°.
    exact = build_view_set("band+poles", 128, 256, 64, 8, band_latitude=45)
    assert {view.top for view in exact.crops} == {32}
    assert canvas_coverage(exact, 128, 256, 64).min() >= 1


@pytest.mark.parametrize("height,width,window,stride", SIZES)
def test_the_band_stays_within_its_latitude(height, width, window, stride):
    poles = build_view_set("band+poles", height, width, window, stride)
    one_row = 180.0 / height
    for view in poles.crops:
        top_lat = 90.0 - view.top / height * 180.0
        bottom_lat = 90.0 - (view.top + view.height) / height * 180.0
        assert top_lat <= 60.0 + one_row and bottom_lat >= -60.0 - one_row


def test_band_poles_needs_a_tall_enough_canvas():
    with pytest.raises(ValueError, match=r"^band\+poles needs a canvas .*taller.*\.$"):
        build_view_set("band+poles", 64, 128, 64, 8)
    with pytest.raises(ValueError, match="between 45 and 90"):
        build_view_set("band+poles", 128, 256, 64, 8, band_latitude=40)
    with pytest.raises(ValueError, match="H x 2H"):
        build_view_set("cube", 64, 100, 64, 8)


def test_face_centres_read_the_right_canvas_pixels():
    h, w, size = 64, 128, 33  # odd size: the view has a centre pixel
    rows, cols = np.mgrid[0:h, 0:w]
    canvas = torch.from_numpy(np.stack([rows, cols]).astype(np.float64))[None]  # channels: row, column
    cube = build_view_set("cube", h, w, 32, 4)
    centre = read_views(canvas, [view for _, view in cube.projected], size)[:, :, size // 2, size // 2]
    faces = {label: centre[k] for k, (label, _) in enumerate(cube.projected)}
    # F looks at the canvas centre: between rows h/2 - 1, h/2 and columns w/2 - 1, w/2.
    assert torch.allclose(faces["F"], torch.tensor([h / 2 - 0.5, w / 2 - 0.5], dtype=torch.float64))
    # R, B, L at the equator, 90°, 180° (the seam: columns w-1 and 0 blend) and -90° round.
    assert torch.allclose(faces["R"], torch.tensor([h / 2 - 0.5, 3 * w / 4 - 0.5], dtype=torch.float64))
    assert torch.allclose(faces["B"][0], torch.tensor(h / 2 - 0.5, dtype=torch.float64))
    assert torch.allclose(faces["B"][1], torch.tensor((w - 1 + 0) / 2, dtype=torch.float64))
    assert torch.allclose(faces["L"], torch.tensor([h / 2 - 0.5, w / 4 - 0.5], dtype=torch.float64))
    # U reads the top row (the pole: the row and its mirror across the pole), D the bottom row.
    assert faces["U"][0] == 0 and faces["D"][0] == h - 1
    # Ring views: yaw k·45° at the equator, column (yaw + 180°)/360°·w − 0.5.
    ring = build_view_set("ring", h, w, 32, 4).projected[:8]
    centre = read_views(canvas, [view for _, view in ring], size)[:, :, size // 2, size // 2]
    for (label, view), value in zip(ring, centre):
        assert value[0] == pytest.approx(h / 2 - 0.5), label
        if view.yaw != 180:
            assert value[1] == pytest.approx((view.yaw + 180) / 360 * w - 0.5), label


@pytest.mark.parametrize("height,width,window,stride", SIZES)
@pytest.mark.parametrize("name", ["cube", "ring"])
def test_grids_reproduce_the_views_directions(name, height, width, window, stride):
    # A canvas holding each pixel's direction, read through the grids, gives each view pixel's direction
    # up to bilinear interpolation of the unit vectors between neighbouring canvas pixels.
    views = [view for _, view in build_view_set(name, height, width, window, stride).projected]
    read = read_views(direction_canvas(height, width), views, window).permute(0, 2, 3, 1).numpy()
    expected = np.stack([view.directions(window) for view in views])
    spacing = np.pi / height  # angle between neighbouring canvas pixel centres (at most)
    assert np.abs(read - expected).max() < 0.3 * spacing ** 2  # measured: 0.24 spacing²
    # Normalised, the read directions point where the view pixels look, to 1% of a canvas pixel (measured 0.3%).
    cos = np.sum(read / np.linalg.norm(read, axis=-1, keepdims=True) * expected, axis=-1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.01 * np.degrees(spacing)


def test_an_arbitrary_view_reads_its_directions():
    view = PerspectiveView(yaw=-150.0, pitch=-70.0, roll=20.0, fov=75.0)
    read = read_views(direction_canvas(64, 128), [view], 40)[0].permute(1, 2, 0).numpy()
    assert np.abs(read - view.directions(40)).max() < 0.3 * (np.pi / 64) ** 2


def test_grid_points_lie_inside_the_padded_canvas():
    for name in ("cube", "ring"):
        for _, view in build_view_set(name, 64, 128, 32, 4).projected:
            grid = projected_view_grid(view, 32, 64, 128)
            assert grid.shape == (32, 32, 2) and grid.dtype == torch.float32
            assert grid.abs().max() < 1


@pytest.mark.parametrize("spelling,canonical", [
    ("band", "band"), ("cube", "cube"), ("ring", "ring"), ("band+poles", "band+poles"),
    ("Poles + Band", "band+poles"), (" RING ", "ring")])
def test_names_parse(spelling, canonical):
    assert parse_view_set(spelling) == canonical


@pytest.mark.parametrize("name,message", [
    ("sphere", "Unknown view set 'sphere'"),
    ("band+sky", "Unknown view set 'sky' in 'band+sky'"),
    ("", "Unknown view set ''"),
    ("band+", "Unknown view set '' in 'band+'"),
    ("poles", "'poles' is not a view set (the up and down faces alone"),
    ("cube+poles", "cube already has the up and down faces"),
    ("ring+cube", "ring already has the cube's faces"),
    ("band+ring", "crop windows combine only with the pole faces"),
    ("band+band", "a part is repeated"),
])
def test_bad_names_raise_one_sentence(name, message):
    with pytest.raises(ValueError) as error:
        parse_view_set(name)
    text = str(error.value)
    assert message in text
    assert text.endswith("use band, cube, ring or band+poles.") and text.count(". ") == 0
    with pytest.raises(ValueError):
        build_view_set(name, 128, 256, 64, 8)
