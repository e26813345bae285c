"""Coherence metrics (backend/analysis/metrics.py, ``python -m backend metrics``): crops, pair means, style loss,
equirect horizon faces, seam ratios, the CLI, and that ``backbone="auto"`` really loads a cached trunk.

CPU only, no network (conftest sets HF_HUB_OFFLINE=1); the loss trunks are random (seeded, repeatable).
"""

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from backend.analysis import metrics
from backend.app.cli import main
from backend.errors import BadRequest
from backend.analysis.metrics import (crop_positions, intra_lpips, intra_style_loss, measure, non_overlapping_crops,
                             seam_ratio)
from backend.engine.perceptual import Backbone, PerceptualLoss, load_perceptual_loss, trunk_checkpoint_path


@pytest.fixture(scope="module")
def losses():
    return metrics.load_losses("random")


def _noise(shape, seed):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _smooth_periodic(height, width):
    """A smooth image periodic in both axes: whole numbers of sine periods across it, per channel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [0.5 + 0.2 * np.sin(2 * np.pi * (k * x / width + 0.1 * c)) + 0.2 * np.cos(2 * np.pi * (m * y / height + 0.3 * c))
                for c, (k, m) in enumerate([(1, 2), (3, 1), (2, 3)])]
    return np.stack(channels, axis=-1).astype(np.float32)


# ---------------------------------------------------------------- crops


def test_crops_are_the_non_overlapping_windows_that_fit_row_by_row():
    image = np.arange(130 * 260 * 3, dtype=np.int64).reshape(130, 260, 3)
    assert crop_positions(130, 260, 64) == [(0, 0), (0, 64), (0, 128), (0, 192), (64, 0), (64, 64), (64, 128), (64, 192)]
    crops = non_overlapping_crops(image, 64)
    assert crops.shape == (8, 64, 64, 3) and crops.dtype == image.dtype
    for crop, (row, col) in zip(crops, crop_positions(130, 260, 64)):
        np.testing.assert_array_equal(crop, image[row:row + 64, col:col + 64])
    assert crop_positions(512, 3072, 512) == [(0, 512 * k) for k in range(6)]  # the paper's 6 crops, 15 pairs
    assert crop_positions(60, 100, 64) == [] and non_overlapping_crops(image[:60, :100], 64).shape == (0, 64, 64, 3)


# ---------------------------------------------------------------- pair means


def test_intra_lpips_is_zero_for_identical_crops_and_positive_for_different_ones(losses):
    identical = non_overlapping_crops(np.tile(_noise((32, 32, 3), 1), (2, 4, 1)), 32)
    different = non_overlapping_crops(_noise((64, 128, 3), 2), 32)
    assert len(identical) == 8
    assert intra_lpips(identical, losses["lpips-vgg"]) < 1e-6
    assert intra_lpips(different, losses["lpips-vgg"]) > 0.01
    assert intra_style_loss(identical, losses["style"]) < 1e-15
    assert intra_style_loss(different, losses["style"]) > 0


@pytest.mark.parametrize("name", ["lpips-vgg", "style"])
def test_pair_mean_equals_a_loop_over_all_combinations(losses, name):
    crops = non_overlapping_crops(_noise((32, 128, 3), 3), 32)  # 4 crops, 6 pairs
    loss = losses[name]
    with torch.no_grad():
        expected = np.mean([float(loss(torch.from_numpy(crops[[i]]).permute(0, 3, 1, 2) * 2 - 1,
                                       torch.from_numpy(crops[[j]]).permute(0, 3, 1, 2) * 2 - 1))
                            for i, j in itertools.combinations(range(len(crops)), 2)])
    metric = intra_lpips if name == "lpips-vgg" else intra_style_loss
    for batch_pairs in (None, 4, 1):
        assert metric(crops, loss, batch_pairs=batch_pairs) == pytest.approx(expected, rel=1e-5)


def test_pairs_are_batched_not_one_call_per_pair(losses):
    calls = []

    class Counting(torch.nn.Module):
        name = "lpips-vgg"

        def forward(self, images, targets):
            calls.append(len(images))
            return losses["lpips-vgg"](images, targets)

    crops = non_overlapping_crops(_noise((64, 128, 3), 4), 32)
    intra_lpips(crops, Counting())
    assert calls == [28]
    calls.clear()
    intra_lpips(crops, Counting(), batch_pairs=5)
    assert calls == [5, 5, 5, 5, 5, 3]


def test_intra_style_loss_equals_a_hand_computed_gram_matrix_value():
    """A one-layer "VGG" (1x1 convolution, known weights): the Gram matrices can be computed by hand."""
    weight = np.array([[0.5, -1.0, 0.25], [1.5, 0.5, -0.75]])
    bias = np.array([0.1, -0.2])
    conv = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor(bias))
    loss = PerceptualLoss("style", torch.nn.Sequential(conv), Backbone("test", False, "hand-made"))
    crops = _noise((3, 4, 5, 3), 5)  # 3 crops of 4 x 5 px, 3 pairs

    def gram(crop):
        normalised = (crop.astype(np.float64) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        features = (normalised @ weight.T + bias).reshape(-1, 2).T  # (C, H*W)
        return features @ features.T / features.size

    pair_losses = [np.mean((gram(crops[i]) - gram(crops[j])) ** 2) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert intra_style_loss(crops, loss) == pytest.approx(np.mean(pair_losses), rel=1e-4)
    assert intra_style_loss(crops, loss) > 0


# ---------------------------------------------------------------- equirect horizon faces


def test_equirect_measures_the_four_horizon_faces(losses):
    # Four identical quarters: F, R, B and L (90° apart) see the same content, the two rows of crops do not.
    quarters = np.tile(_noise((64, 32, 3), 6), (1, 4, 1))
    result = measure(quarters, "equirect", losses=losses)
    assert result["window_px"] == 32 and result["crops"] == 8 and result["pairs"] == 28
    assert result["horizon_faces"] == 4 and result["horizon_faces_pairs"] == 6
    assert result["horizon_faces_intra_lpips"] < 1e-4
    assert result["horizon_faces_intra_style_l"] < 1e-3 * result["intra_style_l"]
    assert result["intra_lpips"] > 0.01
    # Negative control: without the symmetry the faces differ.
    noise = measure(_noise((64, 128, 3), 7), "equirect", losses=losses)
    assert noise["horizon_faces_intra_lpips"] > 0.01 and noise["horizon_faces_intra_style_l"] > 0


def test_horizon_faces_are_the_cube_faces_f_r_b_l():
    from backend.sphere.geometry import equirect_to_cube_faces

    image = _noise((64, 128, 3), 8)
    faces = metrics.horizon_faces(image, 32)
    reference = equirect_to_cube_faces(image, 32)
    for face, name in zip(faces, "FRBL"):
        np.testing.assert_allclose(face, np.clip(reference[name], 0, 1))


# ---------------------------------------------------------------- seams


def test_seam_ratio_is_low_for_a_wrapped_image_and_high_for_a_hard_seam():
    smooth = _smooth_periodic(64, 128)
    rolled = np.roll(smooth, (23, 45), axis=(0, 1))  # the former seam-free edges are now inside
    for axis in (0, 1):
        assert seam_ratio(rolled, axis) < 2.0
    # 2.5 cosine periods across: the last column is the opposite of the first one.
    x = np.arange(128) / 128
    seam = np.repeat((0.5 + 0.4 * np.cos(2 * np.pi * 2.5 * x))[None, :, None], 64, axis=0).repeat(3, axis=2)
    seam = seam + 0.05 * smooth  # some texture across rows
    assert seam_ratio(seam, 1) > 10
    assert seam_ratio(np.swapaxes(seam, 0, 1), 0) == pytest.approx(seam_ratio(seam, 1))
    as_uint8 = (np.clip(seam, 0, 1) * 255).round().astype(np.uint8)
    assert seam_ratio(as_uint8, 1) == pytest.approx(seam_ratio(as_uint8.astype(np.float32) / 255, 1), rel=1e-5)
    edge = np.zeros((8, 8, 3))
    edge[:, -1] = 1.0  # constant but for the last column: no typical difference, a seam
    assert seam_ratio(np.zeros((8, 8, 3)), 1) == 0.0 and math.isinf(seam_ratio(edge, 1))


# ---------------------------------------------------------------- sphere seams: cube edges and poles


def _sphere_image(height, seed=0, latitude_limit=None):
    """An equirect image that is a smooth function of direction (linear plus a sine per channel). With
    ``latitude_limit`` (degrees), rows nearer a pole show the colour of that latitude at their longitude:
    the pinch into a star that flat content gives at the poles."""
    from backend.sphere.geometry import lonlat_to_direction

    width = 2 * height
    rows, cols = np.mgrid[0:height, 0:width]
    lon = (cols + 0.5) / width * 2 * np.pi - np.pi
    lat = np.pi / 2 - (rows + 0.5) / height * np.pi
    if latitude_limit is not None:
        lat = np.clip(lat, -np.radians(latitude_limit), np.radians(latitude_limit))
    directions = lonlat_to_direction(lon, lat)
    rng = np.random.default_rng(seed)
    linear, wave = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    return np.stack([0.5 + 0.15 * directions @ linear[c] + 0.1 * np.sin(2 * directions @ wave[c]) for c in range(3)],
                    axis=-1).astype(np.float32)


def test_cube_edges_are_the_twelve_edges_and_pair_texels_across_them():
    from backend.sphere.geometry import FACES, cube_face_directions

    size = 16
    edges = metrics.cube_edges(size)
    pairs = {frozenset((edge[1], edge[4])) for edge in edges}
    assert len(edges) == 12 and len(pairs) == 12
    assert not pairs & {frozenset("FB"), frozenset("RL"), frozenset("UD")}  # opposite faces never meet
    assert all(sum(face in pair for pair in pairs) == 4 for face in FACES)
    texel = np.radians(90) / size  # at a face's centre; texels are smaller towards its edges
    for name, face_a, (rows_a, cols_a), axis_a, face_b, (rows_b, cols_b), axis_b in edges:
        a = cube_face_directions(face_a, size)[rows_a, cols_a]
        b = cube_face_directions(face_b, size)[rows_b, cols_b]
        # Texels meeting across the edge are less than a (central) texel apart, and each of B's is the
        # nearest of B's side to its partner in A.
        angles = np.arccos(np.clip((a * b).sum(axis=-1), -1, 1))
        assert angles.max() < texel, name
        nearest = np.argmax(a @ b.T, axis=1)  # b is B's whole side, in A's order along the edge
        assert (nearest == np.arange(size)).all(), name
        # The axis across the edge: the outer texels lie on one column (axis 1) or one row (axis 0).
        assert len(set((cols_a if axis_a == 1 else rows_a).tolist())) == 1
        assert len(set((cols_b if axis_b == 1 else rows_b).tolist())) == 1


@pytest.mark.parametrize("seed", range(4))
def test_a_smooth_sphere_passes_at_every_cube_edge_and_pole(seed):
    image = _sphere_image(256, seed)
    edges = metrics.cube_edge_ratios(image)
    poles = metrics.pole_ratios(image)
    print(f"smooth sphere {seed}: edges {min(edges.values()):.2f}-{max(edges.values()):.2f}, poles {poles}")
    assert len(edges) == 12 and max(edges.values()) < 1.2
    assert all(0.8 < value < 1.2 for value in poles.values())


def test_a_seam_at_cube_face_edges_fails_there_only():
    from backend.sphere.geometry import cube_faces_to_equirect, equirect_to_cube_faces

    faces = equirect_to_cube_faces(_sphere_image(256), 128)
    faces["R"] = faces["R"] + 0.1  # the right face painted separately, a little brighter
    image = cube_faces_to_equirect(faces, 512)
    edges = metrics.cube_edge_ratios(image)
    print("face R + 0.1:", {name: round(value, 2) for name, value in edges.items()})
    for name, value in edges.items():
        if "R" in name:
            assert value > 3, name
        else:
            assert value < 1.2, name


@pytest.mark.parametrize("case", ["pinch at 80°", "pinch at 87°", "cap", "half and half"])
def test_a_pinched_or_broken_pole_fails(case):
    height = 256
    if case.startswith("pinch"):
        image = _sphere_image(height, latitude_limit=float(case[-3:-1]))
    else:
        image = _sphere_image(height)
        rows = np.arange(height)[:, None]
        polar = np.minimum(rows + 0.5, height - rows - 0.5) / height * 180.0  # degrees from the nearer pole
        if case == "cap":  # a brighter cap 3° across at each pole
            image = image + 0.1 * (polar < 3.0)[..., None]
        else:  # half of each polar cap from another image: a hard line through the pole
            other = _sphere_image(height, seed=5)
            mask = (polar < 8.0) & (np.arange(2 * height)[None, :] < height)
            image = np.where(mask[..., None], other, image)
    poles = metrics.pole_ratios(image)
    print(f"{case}: {poles}")
    assert poles["U"] > 1.2 and poles["D"] > 1.2


def test_measure_reports_cube_edge_and_pole_ratios_for_equirect_only(losses):
    image = _sphere_image(64)
    result = measure(image, "equirect", losses=losses)
    assert result["cube_edge_ratios"] == pytest.approx(metrics.cube_edge_ratios(image))
    assert result["cube_edge_ratio_max"] == pytest.approx(max(result["cube_edge_ratios"].values()))
    poles = metrics.pole_ratios(image)
    assert (result["pole_ratio_up"], result["pole_ratio_down"]) == pytest.approx((poles["U"], poles["D"]))
    assert result["seam_ratio_x"] == pytest.approx(seam_ratio(image, 1))  # the ±180° meridian
    json.dumps(result, allow_nan=False)
    as_uint8 = measure((image * 255).round().astype(np.uint8), "equirect", losses=losses)
    assert as_uint8["cube_edge_ratio_max"] == pytest.approx(result["cube_edge_ratio_max"], rel=0.05)
    tile = measure(_smooth_periodic(64, 64), "tile", losses=losses)
    assert not any(key.startswith(("cube_edge", "pole_")) for key in tile)


def test_tiny_model_equirect_job_seam_and_pole_ratios(tiny_model, tmp_path):
    """The ratios of a real (tiny, random) generation: reported, and checked where they do not depend on
    content (docs/conventions.md#random-models): turning the panorama by 90° of yaw permutes the cube faces and
    turns U and D by a quarter, so the 12 edge ratios are permuted and the pole ratios stay as they are."""
    from backend.app.job import check_request, run_job
    from backend.request import GenerateRequest

    request = GenerateRequest(prompt="a forest clearing", layout="equirect", width=512, height=256, steps=3,
                              window=16, stride=8, seed=11, device="cpu", model=tiny_model, out=str(tmp_path / "out"))
    image = np.asarray(Image.open(run_job(check_request(request))["png"])).astype(np.float32) / 255.0
    edges, poles = metrics.cube_edge_ratios(image), metrics.pole_ratios(image)
    seam = seam_ratio(image, 1)
    print(f"tiny model 512x256: cube edges {({name: round(value, 3) for name, value in edges.items()})}, "
          f"max {max(edges.values()):.3f}; poles {({face: round(value, 3) for face, value in poles.items()})}; "
          f"seam at ±180° {seam:.3f}")
    assert len(edges) == 12 and all(math.isfinite(value) for value in [*edges.values(), *poles.values(), seam])
    turned = np.roll(image, 128, axis=1)  # 90° of yaw
    assert sorted(metrics.cube_edge_ratios(turned).values()) == pytest.approx(sorted(edges.values()), rel=1e-4)
    assert metrics.pole_ratios(turned) == pytest.approx(poles, rel=1e-4)


def test_measure_reports_seams_per_layout_and_the_backbones(losses):
    tile = measure(np.roll(_smooth_periodic(64, 64), 20, axis=1), "tile", losses=losses)
    assert tile["window_px"] == 32 and tile["crops"] == 4 and tile["pairs"] == 6
    assert tile["seam_ratio_x"] < 2.0 and tile["seam_ratio_y"] < 2.0
    wide = measure(_noise((32, 128, 3), 9), "wide", losses=losses)
    assert wide["window_px"] == 32 and wide["crops"] == 4 and not any(key.startswith("seam") for key in wide)
    assert "horizon_faces_intra_lpips" not in wide and "horizon_faces_intra_lpips" not in tile
    assert wide["backbones"] == {"lpips-vgg": "vgg16 random (asked for)", "style": "vgg19 random (asked for)"}
    assert wide["pretrained"] is False
    json.dumps(wide, allow_nan=False)  # plain JSON


@pytest.mark.parametrize("shape,layout,window,message", [
    ((32, 64, 3), "wide", None, "fits 2"),  # fits 2 crops: fine, checked below
    ((32, 48, 3), "wide", None, "fits 1 non-overlapping crop "),
    ((64, 128, 3), "wide", 100, "fits 0 non-overlapping crops"),
    ((64, 192, 3), "equirect", None, "twice as wide"),
    ((64, 64, 3), "cylinder", None, "Unknown layout"),
    ((64, 64, 3), "tile", 8, "at least 16 px"),
    ((64, 64), "tile", None, "RGB"),
])
def test_bad_input_is_one_sentence_before_any_network_loads(monkeypatch, shape, layout, window, message):
    monkeypatch.setattr(metrics, "load_losses", lambda *args, **kwargs: pytest.fail("loaded networks for bad input"))
    if message == "fits 2":
        assert metrics.check_measurable(shape, layout, window) == 32
        return
    with pytest.raises(BadRequest, match=message) as error:
        measure(np.zeros(shape, np.float32), layout, window)
    text = str(error.value)
    assert text.endswith(".") and "\n" not in text and text.count(". ") == 0


# ---------------------------------------------------------------- CLI


def _png(path, image):
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return str(path)


def test_cli_prints_json_with_the_backbone_stated(tmp_path, capsys):
    path = _png(tmp_path / "wide.png", _noise((48, 160, 3), 10))
    code = main(["metrics", path, "--layout", "wide", "--backbone", "random", "--json", str(tmp_path / "m.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["layout"] == "wide" and result["window_px"] == 48 and result["crops"] == 3 and result["pairs"] == 3
    assert result["intra_lpips"] > 0 and result["intra_style_l"] > 0
    assert "random" in result["backbones"]["lpips-vgg"] and "random" in result["backbones"]["style"]
    assert result["pretrained"] is False
    assert json.loads((tmp_path / "m.json").read_text()) == result


@pytest.mark.parametrize("case", ["missing", "window", "ratio", "json-folder"])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(metrics, "load_losses", lambda *args, **kwargs: pytest.fail("loaded networks for bad input"))
    wide = _png(tmp_path / "wide.png", _noise((32, 128, 3), 11))
    args = {
        "missing": [str(tmp_path / "nothing.png"), "--layout", "wide"],
        "window": [wide, "--layout", "wide", "--window-px", "200"],
        "ratio": [_png(tmp_path / "three.png", _noise((32, 96, 3), 12)), "--layout", "equirect"],
        "json-folder": [wide, "--layout", "wide", "--json", str(tmp_path / "no" / "m.json")],
    }[case]
    code = main(["metrics", *args, "--backbone", "random"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(".")


def test_cli_unknown_layout_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["metrics", "x.png", "--layout", "cylinder"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_exr_is_read_as_srgb(tmp_path):
    from backend.products.images import srgb_to_linear, write_exr

    image = _noise((8, 16, 3), 13)
    write_exr(str(tmp_path / "p.exr"), srgb_to_linear(image))
    np.testing.assert_allclose(metrics.read_image(str(tmp_path / "p.exr")), image, atol=1e-5)


# ---------------------------------------------------------------- backbone="auto"


def test_auto_backbone_loads_a_cached_trunk_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torchvision

    path = trunk_checkpoint_path("vgg16")
    assert path.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # not the random backbone's seed 0, so equal weights prove the file was read
        saved = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(saved, path)
    loss = load_perceptual_loss("lpips-vgg", backbone="auto")
    assert loss.backbone.pretrained is True and loss.backbone.describe() == "vgg16 pretrained"
    trunk = {index: layer for part in loss.network.net.children() for index, layer in part.named_children()}
    for index in ("0", "28"):  # first and last convolution of VGG16's features
        torch.testing.assert_close(trunk[index].weight, saved[f"features.{index}.weight"], rtol=0, atol=0)
    del saved, loss
    os.remove(path)

    # No file and downloads off (HF_HUB_OFFLINE=1 from conftest): random, and the note says why.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    loss = load_perceptual_loss("lpips-vgg", backbone="auto")
    assert loss.backbone.pretrained is False and "not cached" in loss.backbone.note
    assert "random" in loss.backbone.describe()
