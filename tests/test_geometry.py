"""Sphere geometry and cube maps (backend/sphere/geometry.py, ``python -m backend cubemap``): directions,
agreement with py360convert's ``e2c``, the longitude seam, and the cube map files. numpy only; fast."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.app.cli import main
from backend.sphere.geometry import (
    FACES,
    cube_face_directions,
    direction_to_equirect,
    direction_to_lonlat,
    equirect_to_cube_faces,
    equirect_to_direction,
    faces_to_dice,
    faces_to_horizon,
    lonlat_to_direction,
)
from backend.products.images import read_exr, write_exr, write_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def py360convert():
    """The reference implementation (requirements-dev.txt); only the tests comparing with it need it."""
    return pytest.importorskip("py360convert")


# (H, W, face size): the usual W/4, a face size that divides nothing, and an odd-sized image.
SIZES = [(128, 256, 64), (128, 256, 50), (100, 200, 37)]


def noise(shape, seed=0):
    """White noise in [0, 1): every misplaced sample shows."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def smooth(height, width, cells=16, seed=0):
    """A random image smooth at the scale of ``width / cells`` px and periodic in longitude: a sum of
    random low-frequency waves, so that sub-pixel differences in where two samplers look stay small."""
    rng = np.random.default_rng(seed)
    lon = (np.arange(width) + 0.5) / width * 2 * np.pi
    lat = (np.arange(height) + 0.5) / height * np.pi
    image = np.zeros((height, width, 3))
    for _ in range(12):
        k, m = rng.integers(0, cells // 2, size=2)  # whole cycles in longitude: periodic across the seam
        phase = rng.random((2, 3)) * 2 * np.pi
        image += np.cos(k * lon[None, :, None] + phase[0]) * np.cos(m * lat[:, None, None] + phase[1])
    return (0.5 + image / 12).astype(np.float32)


# --- directions -------------------------------------------------------------------------------------


def test_pixel_centres_follow_design_section_3():
    width, height = 8, 4
    directions = equirect_to_direction(np.arange(width), np.zeros(width), width, height)
    lon, lat = direction_to_lonlat(directions)
    np.testing.assert_allclose(lon, (np.arange(width) + 0.5) / width * 2 * np.pi - np.pi, atol=1e-12)
    np.testing.assert_allclose(lat, np.pi / 2 - 0.5 / height * np.pi, atol=1e-12)  # the top row looks up
    # The image centre looks forward (+z); a quarter turn to the right is +x; up is +y.
    np.testing.assert_allclose(equirect_to_direction(width / 2 - 0.5, height / 2 - 0.5, width, height), [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(lonlat_to_direction(np.pi / 2, 0), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(lonlat_to_direction(0, np.pi / 2), [0, 1, 0], atol=1e-12)


def test_direction_round_trips():
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(1000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    col, row = direction_to_equirect(directions, 512, 256)
    assert col.min() >= -0.5 and col.max() <= 511.5 and row.min() >= -0.5 and row.max() <= 255.5
    np.testing.assert_allclose(equirect_to_direction(col, row, 512, 256), directions, atol=1e-12)

    col, row = rng.uniform(-0.5, 511.5, 1000), rng.uniform(-0.4, 255.4, 1000)  # not at the poles
    back_col, back_row = direction_to_equirect(equirect_to_direction(col, row, 512, 256), 512, 256)
    np.testing.assert_allclose(back_row, row, atol=1e-9)
    # Longitude is periodic: col and col + W are the same meridian.
    np.testing.assert_allclose((back_col - col + 256) % 512 - 256, 0, atol=1e-9)


@pytest.mark.parametrize("edge_aligned", [False, True])
def test_cube_face_directions_are_unit_and_look_where_the_face_is_named(edge_aligned):
    size = 5  # odd: the middle texel is the face centre
    expected = {"F": (0, 0), "R": (90, 0), "B": (180, 0), "L": (-90, 0), "U": (None, 90), "D": (None, -90)}
    for face, (yaw, pitch) in expected.items():
        directions = cube_face_directions(face, size, edge_aligned=edge_aligned)
        assert directions.shape == (size, size, 3)
        np.testing.assert_allclose(np.linalg.norm(directions, axis=-1), 1, atol=1e-12)
        lon, lat = np.degrees(direction_to_lonlat(directions[2, 2]))
        assert lat == pytest.approx(pitch, abs=1e-9)
        if yaw is not None:
            assert abs((lon - yaw + 180) % 360 - 180) < 1e-9, face
    # Not mirrored: F's top-right texel looks right and up; U's bottom row and D's top row look forward.
    f = cube_face_directions("F", size)
    assert f[0, -1, 0] > 0 and f[0, -1, 1] > 0
    assert (cube_face_directions("U", size)[-1, :, 2] > 0).all()
    assert (cube_face_directions("D", size)[0, :, 2] > 0).all()
    # R's left column borders F (z > 0), its right column B (z < 0): turning right along the horizon.
    r = cube_face_directions("R", size)
    assert (r[:, 0, 2] > 0).all() and (r[:, -1, 2] < 0).all()


def test_face_centres_sample_the_equirect_where_design_section_3_says():
    """F shows the image centre (yaw 0), R the point a quarter turn to the right (yaw +90), U the top rows."""
    height, width = 64, 128
    image = np.zeros((height, width, 3), np.float32)
    horizon = slice(height // 2 - 4, height // 2 + 4)
    image[horizon, width // 2 - 4:width // 2 + 4, 0] = 1  # red around yaw 0
    image[horizon, 3 * width // 4 - 4:3 * width // 4 + 4, 1] = 1  # green around yaw +90 (right of centre)
    image[:4, :, 2] = 1  # blue near the zenith
    faces = equirect_to_cube_faces(image, 33)
    centre = {face: faces[face][16, 16] for face in FACES}
    np.testing.assert_array_equal(centre["F"], [1, 0, 0])
    np.testing.assert_array_equal(centre["R"], [0, 1, 0])
    np.testing.assert_array_equal(centre["U"], [0, 0, 1])
    for face in "BLD":
        np.testing.assert_array_equal(centre[face], [0, 0, 0])


# --- agreement with py360convert -----------------------------------------------------------------------


@pytest.mark.parametrize("height,width,size", SIZES)
def test_edge_aligned_faces_equal_py360convert_e2c(height, width, size, py360convert):
    """With py360convert's texel grid our sampler is its sampler: same orientation, seam and poles.

    Measured on white noise (py360convert 1.0.4, scipy's map_coordinates order 1, no cv2): mean |diff|
    about 1e-6, max 1.3e-5 to 3.4e-5 (256 x 512). The residue is py360convert's float32 coordinates (an error
    of ~1e-5 px near column 512); a seam or orientation mistake would give differences of order 0.3.
    """
    image = noise((height, width, 3))
    ours = equirect_to_cube_faces(image, size, edge_aligned=True)
    theirs = py360convert.e2c(image, size, mode="bilinear", cube_format="dict")
    for face in FACES:
        assert ours[face].shape == theirs[face].shape == (size, size, 3) and ours[face].dtype == np.float32
        difference = np.abs(ours[face] - theirs[face])
        assert difference.mean() < 1e-5 and difference.max() < 2e-4, (face, difference.mean(), difference.max())
    np.testing.assert_allclose(faces_to_dice(ours), py360convert.e2c(image, size, mode="bilinear", cube_format="dice"), atol=2e-4)
    np.testing.assert_allclose(faces_to_horizon(ours), py360convert.e2c(image, size, mode="bilinear", cube_format="horizon"), atol=2e-4)


@pytest.mark.parametrize("height,width,size", SIZES)
def test_texel_centred_faces_agree_with_py360convert_on_smooth_images(height, width, size, py360convert):
    """Our default grid samples texel centres; py360convert's runs edge to edge. The two grids differ
    by a scale of (s − 1)/s, up to half a texel at a face's rim, so they are compared on smooth images
    (the sampler itself is compared exactly above).

    Measured (image smooth at the scale of W/16 px): mean |diff| 0.004 (s = 64) to 0.007 (s = 37), max
    0.018 to 0.031. On white noise the same two grids differ by mean 0.07 to 0.1, max 0.35 to 0.42.
    """
    image = smooth(height, width)
    ours = equirect_to_cube_faces(image, size)
    theirs = py360convert.e2c(image, size, mode="bilinear", cube_format="dict")
    difference = np.stack([np.abs(ours[face] - theirs[face]) for face in FACES])
    assert difference.mean() < 0.01 and difference.max() < 0.05, (difference.mean(), difference.max())


def test_layouts_place_faces_as_py360convert_does(py360convert):
    size = 4
    faces = {face: np.full((size, size, 2), index + 1, np.float32) for index, face in enumerate(FACES)}
    dice = faces_to_dice(faces)
    assert dice.shape == (3 * size, 4 * size, 2)
    cells = dice[::size, ::size, 0]
    np.testing.assert_array_equal(cells, [[0, 5, 0, 0], [4, 1, 2, 3], [0, 6, 0, 0]])  # U / L F R B / D
    np.testing.assert_array_equal(py360convert.cube_dice2h(dice), faces_to_horizon(faces))
    assert faces_to_horizon(faces).shape == (size, 6 * size, 2)
    with pytest.raises(ValueError, match="U is missing"):
        faces_to_dice({face: faces[face] for face in "FRBLD"})


# --- the seam and the poles, without py360convert -----------------------------------------------------------


def test_faces_of_a_smooth_function_of_direction_are_exact_everywhere():
    """An image holding a linear function of the view direction: every face texel, including those
    on the seam (face B) and at the poles (across them), must hold that function of its direction.

    Measured: max error 1.1e-4 (256 x 512, face 96; bilinear interpolation's curvature error). The image
    shifted by one column (a seam column repeated or missed) gives errors of 0.026 to 0.037.
    """
    height, width = 256, 512
    weights = np.array([1.0, 2.0, 3.0])
    rows, cols = np.mgrid[0:height, 0:width]
    image = equirect_to_direction(cols, rows, width, height) * weights  # (H, W, 3), one term per channel
    faces = equirect_to_cube_faces(image, 96)
    for face in FACES:
        expected = cube_face_directions(face, 96) * weights
        error = np.abs(faces[face] - expected).max()
        assert error < 2e-4, (face, error)


def test_turning_the_image_a_quarter_turn_turns_the_faces():
    """Rolling the equirect W/4 columns to the right is turning the world 90° right: F shows what L
    showed, and so on round; U and D turn in place. White noise, compared to rounding error: no column
    at the seam is repeated or skipped."""
    height, width, size = 64, 128, 40
    image = noise((height, width, 3), seed=3).astype(np.float64)
    before = equirect_to_cube_faces(image, size)
    after = equirect_to_cube_faces(np.roll(image, width // 4, axis=1), size)
    for new, old in (("F", "L"), ("R", "F"), ("B", "R"), ("L", "B")):
        np.testing.assert_allclose(after[new], before[old], atol=1e-9, err_msg=new)
    np.testing.assert_allclose(after["U"], np.rot90(before["U"], 1), atol=1e-9)
    np.testing.assert_allclose(after["D"], np.rot90(before["D"], -1), atol=1e-9)


def test_input_checks():
    with pytest.raises(ValueError, match="Unknown cube face"):
        cube_face_directions("X", 4)
    with pytest.raises(ValueError, match="positive integer"):
        cube_face_directions("F", 0)
    with pytest.raises(ValueError, match="(H, W, C)"):
        equirect_to_cube_faces(np.zeros((8, 16)), 4)
    faces = equirect_to_cube_faces(np.zeros((8, 16, 1), np.uint8), 4)
    assert faces["F"].dtype == np.float32


# --- python -m backend cubemap -------------------------------------------------------------------------


def cubemap(capsys, *args):
    """Run ``main(["cubemap", *args])``; returns (exit code, stderr)."""
    code = main(["cubemap", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_cli_writes_exr_faces_and_the_dice_cross(tmp_path, capsys):
    panorama = tmp_path / "panorama.exr"
    image = noise((32, 64, 3), seed=4) * 20  # HDR values above 1 survive
    write_exr(str(panorama), image)
    out = tmp_path / "cubemap"
    code, message = cubemap(capsys, panorama, "--out", out)
    assert code == 0, message
    names = [f"face_{face}.exr" for face in FACES] + ["cubemap_dice.exr"]
    assert sorted(os.listdir(out)) == sorted(names)  # and no partial files
    faces = {face: read_exr(str(out / f"face_{face}.exr")) for face in FACES}
    assert faces["F"].shape == (16, 16, 3)  # default face size: W / 4
    np.testing.assert_array_equal(read_exr(str(out / "cubemap_dice.exr")), faces_to_dice(faces))
    expected = equirect_to_cube_faces(image, 16)
    for face in FACES:
        np.testing.assert_array_equal(faces[face], expected[face])  # float32 EXR: exact
    assert faces["F"].max() > 1

    # Existing files are kept without --overwrite, replaced with it.
    code, message = cubemap(capsys, panorama, "--out", out, "--face-size", "8")
    assert code == 2 and "--overwrite" in message and read_exr(str(out / "face_F.exr")).shape == (16, 16, 3)
    code, message = cubemap(capsys, panorama, "--out", out, "--face-size", "8", "--overwrite")
    assert code == 0 and read_exr(str(out / "cubemap_dice.exr")).shape == (24, 32, 3)


def test_cli_writes_pngs_for_a_png(tmp_path, capsys):
    panorama = tmp_path / "panorama.png"
    image = smooth(32, 64)
    write_png(str(panorama), image)
    out = tmp_path / "out"
    code, message = cubemap(capsys, panorama, "--out", out, "--face-size", "12")
    assert code == 0, message
    faces = {face: np.asarray(Image.open(out / f"face_{face}.png")) for face in FACES}
    assert faces["F"].shape == (12, 12, 3) and faces["F"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(Image.open(out / "cubemap_dice.png")), faces_to_dice(faces))
    stored = np.asarray(Image.open(panorama), np.float32) / 255
    expected = equirect_to_cube_faces(stored, 12)
    assert max(np.abs(faces[face] / 255.0 - expected[face]).max() for face in FACES) <= 0.5 / 255 + 1e-6


def test_cli_runs_as_a_module(tmp_path):
    panorama = tmp_path / "p.exr"
    write_exr(str(panorama), noise((8, 16, 3)))
    result = subprocess.run([sys.executable, "-m", "backend", "cubemap", str(panorama), "--out", str(tmp_path / "c")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "c" / "cubemap_dice.exr") and "cubemap_dice.exr" in result.stderr


def _not_two_to_one(tmp_path):
    write_exr(str(tmp_path / "square.exr"), noise((16, 16, 3)))
    return tmp_path / "square.exr"


def _panorama(tmp_path):
    write_exr(str(tmp_path / "p.exr"), noise((8, 16, 3)))
    return tmp_path / "p.exr"


def _text_file(tmp_path, name):
    (tmp_path / name).write_text("not an image")
    return tmp_path / name


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "missing.exr", [], "does not exist"),
    "wrong type": (lambda tmp: _text_file(tmp, "panorama.gif"), [], "not an .exr, .png or .jpg"),
    "unreadable exr": (lambda tmp: _text_file(tmp, "broken.exr"), [], "Could not read the panorama"),
    "unreadable png": (lambda tmp: _text_file(tmp, "broken.png"), [], "Could not read the panorama"),
    "not 2:1": (_not_two_to_one, [], "twice as wide as it is high"),
    "face size 0": (_panorama, ["--face-size", "0"], "--face-size 0"),
    "face size not a number": (_panorama, ["--face-size", "big"], "invalid int value"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_is_one_sentence_exit_2_and_writes_nothing(tmp_path, capsys, case):
    make, extra, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    try:
        code, message = cubemap(capsys, make(tmp_path), "--out", out, *extra)
    except SystemExit as exit:  # argparse's own errors exit from parse_args
        code, message = exit.code, capsys.readouterr().err.strip()
    assert code == 2 and expected in message, message
    assert len(message.splitlines()) == 1 and message.startswith("error: ") and message.endswith("."), message
    assert not out.exists()


def test_cli_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    code, message = cubemap(capsys, _panorama(tmp_path), "--out", tmp_path / "out")
    assert code == 2 and "is not a folder" in message


def test_cli_failure_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    import backend.products.images

    written = []

    def write_exr_then_fail(path, image):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        write_exr(path, image)

    write_exr(str(tmp_path / "p.exr"), noise((8, 16, 3)))
    monkeypatch.setattr(backend.products.images, "write_exr", write_exr_then_fail)
    code, message = cubemap(capsys, tmp_path / "p.exr", "--out", tmp_path / "out")
    assert code == 1 and "No space left on device" in message and len(message.splitlines()) == 1
    assert written and not (tmp_path / "out").exists()  # the first face was written, then removed
