"""The command line: bad input, outputs, determinism, atomic writes, progress events."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from backend.app.cli import main
from backend.errors import SyncSphereError
from backend.products.images import read_exr, srgb_to_linear
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "2", "--window", "16", "--stride", "8", "--device", "cpu"]


def run_cli(*args, env=None):
    """Run ``python -m backend`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True, env=full_env, cwd=REPO)


BAD_INPUTS = {
    "not a multiple of the VAE factor": ["--layout", "equirect", "--width", "1020", "--height", "510"],
    "equirect not 2:1": ["--layout", "equirect", "--width", "1024", "--height", "256"],
    "smaller than one window": ["--layout", "wide", "--width", "128", "--height", "128", "--window", "32"],
    "larger than 16384 px": ["--layout", "wide", "--width", "16392", "--height", "512"],
    "zero steps": ["--steps", "0"],
    "negative guidance": ["--guidance", "-1"],
    "unknown layout": ["--layout", "cylinder"],
    "stride larger than window": ["--window", "16", "--stride", "17"],
    "unknown scheduler": ["--scheduler", "NoSuchScheduler"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_sentence_exit_2_and_no_folder(tiny_model, tmp_path, capsys, case):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), *BAD_INPUTS[case]])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and error.endswith(".")
    assert not out.exists()


@pytest.mark.parametrize("model,expected", [
    ("/no/such/model", "does not exist"),
    ("./missing.safetensors", "does not exist"),
])
def test_unreadable_model_paths_are_refused(tmp_path, capsys, model, expected):
    code = main(["generate", "--prompt", "x", "--model", model, "--out", str(tmp_path / "out")])
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoint_needs_allow_pickle(tmp_path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    code = main(["generate", "--prompt", "x", "--model", str(checkpoint), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "pickled" in error and "--allow-pickle" in error


def test_folder_with_only_pickled_weights_is_refused(tiny_model, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code = main(["generate", "--prompt", "x", "--model", str(folder), "--out", str(tmp_path / "out"), *FAST])
    error = capsys.readouterr().err
    assert code == 2 and "--allow-pickle" in error
    assert not (tmp_path / "out").exists()


def test_hub_model_not_cached_offline_names_it_and_says_how_to_use_a_local_path(tmp_path):
    result = run_cli("generate", "--prompt", "x", "--model", "stabilityai/stable-diffusion-2-base", "--out",
                     str(tmp_path / "out"), env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "stabilityai/stable-diffusion-2-base" in result.stderr and "--model PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_not_replaced_without_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "panorama.png").write_bytes(b"the user's file")
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile", "--width", "128", "--height", "128", *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "panorama.png").read_bytes() == b"the user's file"


def test_same_seed_gives_identical_png_bytes_and_outputs_are_consistent(tiny_model, tmp_path):
    paths = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        out = tmp_path / name
        assert main(["generate", "--prompt", "a lighthouse", "--model", tiny_model, "--out", str(out), "--layout", "equirect",
                     "--width", "256", "--height", "128", "--seed", seed, *FAST]) == 0
        paths.append(out)
    pngs = [(path / "panorama.png").read_bytes() for path in paths]
    assert pngs[0] == pngs[1] and pngs[0] != pngs[2]

    image = np.asarray(Image.open(paths[0] / "panorama.png"))
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    exr = read_exr(str(paths[0] / "panorama_sky.exr"))
    assert exr.dtype == np.float32 and exr.shape == (128, 256, 3)
    # The sky EXR (panorama.exr without the HDR emitters, tests/test_hdr.py) is the linear version of the same
    # image (the PNG is its 8-bit sRGB quantisation).
    assert np.abs(srgb_to_linear(image / 255.0) - exr).max() < 0.01
    metadata = json.loads((paths[0] / "metadata.json").read_text())
    assert metadata["seed"] == 5 and metadata["params"]["prompt"] == "a lighthouse"
    assert metadata["model"]["vae_scale_factor"] == 8 and metadata["versions"]["diffusers"]
    assert set(metadata["timings"]) >= {"loading_s", "denoising_s", "decoding_s", "total_s"}


def test_omitted_seed_is_picked_and_recorded(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile",
                 "--width", "128", "--height", "128", *FAST]) == 0
    assert isinstance(json.loads((out / "metadata.json").read_text())["seed"], int)


def test_failure_while_writing_leaves_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    import backend.products.images

    def failing_json(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(backend.products.images, "write_json", failing_json)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile", "--width", "128", "--height", "128", *FAST])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and error == f"error: Could not write the outputs into {out} (disk full); nothing was written."
    assert os.listdir(tmp_path) == []  # no folder, no hidden folder beside it, no lock file


def test_run_killed_while_writing_leaves_no_png_and_next_run_cleans_up(tiny_model, tmp_path):
    out = tmp_path / "out"
    # Kill the process (SIGKILL: no clean-up runs) right after the PNG's bytes are written.
    script = textwrap.dedent(f"""
        import os, signal, sys
        import backend.products.images as outputs
        real_write_png = outputs.write_png
        def write_png_then_die(path, image):
            real_write_png(path, image)
            os.kill(os.getpid(), signal.SIGKILL)
        outputs.write_png = write_png_then_die
        from backend.app.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = ["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile", "--width", "128", "--height", "128", *FAST]
    result = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()
    assert any(".out.syncsphere-new-" in name for name in os.listdir(tmp_path))  # the kill really happened mid-write

    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["metadata.json", "panorama.exr", "panorama.png"]
    assert os.listdir(tmp_path) == ["out"]  # the hidden folder and the stale lock file are gone


def test_json_progress_prints_only_protocol_events_on_stdout(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli("generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile",
                     "--width", "128", "--height", "128", "--json-progress", *FAST)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    stages = [event["stage"] for event in events if event["event"] == "progress"]
    assert stages == ["loading", "denoising", "denoising", "decoding", "writing"]
    # As the stdio worker: the second step's event has its seconds (protocol.StepTimer), the first none.
    assert [(event["step"], event["seconds_per_step"] >= 0) for event in events if "seconds_per_step" in event] == [(2, True)]
    assert events[-1]["event"] == "done" and os.path.isfile(events[-1]["outputs"]["png"])


def test_json_progress_reports_errors_as_events(tmp_path):
    result = run_cli("generate", "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "out"), "--json-progress")
    assert result.returncode == 2
    event = json.loads(result.stdout)
    assert event["event"] == "error" and event["kind"] == "bad_request" and "--steps" in event["message"]


def test_help_explains_every_flag():
    result = run_cli("generate", "--help")
    for flag in ["--prompt", "--negative-prompt", "--layout", "--width", "--height", "--steps", "--guidance", "--seed",
                 "--window", "--stride", "--view-batch", "--model", "--device", "--dtype", "--out", "--overwrite",
                 "--allow-pickle", "--json-progress"]:
        assert flag in result.stdout


def test_info_prints_device_and_versions():
    result = run_cli("info")
    info = json.loads(result.stdout)
    assert result.returncode == 0 and info["device"] == "cpu" and info["dtype"] == "float32" and info["versions"]["torch"]


# ---------------------------------------------------------------- the cube map of 360° jobs


def _job(tiny_model, out, layout, width, height, **extra):
    """Run one generation through check_request / run_job (what the CLI and the server call); its outputs."""
    from backend.app.job import check_request, run_job
    from backend.request import GenerateRequest

    request = GenerateRequest(prompt="a courtyard", layout=layout, width=width, height=height, steps=2, window=16,
                              stride=8, seed=3, device="cpu", model=tiny_model, out=str(out), **extra)
    return run_job(check_request(request))


def test_equirect_job_writes_the_cube_map_of_its_png_in_the_same_folder(tiny_model, tmp_path):
    from backend.products.cubemap import output_names, write_cubemap
    from backend.sphere.geometry import FACES, equirect_to_cube_faces, faces_to_dice, faces_to_horizon
    from backend.products.images import to_uint8
    from backend.protocol import done_event

    out = tmp_path / "out"
    outputs = _job(tiny_model, out, "equirect", 512, 256)
    cube_names = output_names(".png", horizon=True)
    # With the HDR lighting files (tests/test_hdr.py checks them).
    assert sorted(os.listdir(out)) == sorted(["metadata.json", "panorama.exr", "panorama.png", "panorama_sky.exr",
                                              "lighting.json", *cube_names])
    # The done event's outputs: the existing keys as before, the cube map under its own keys.
    assert outputs["png"] == str(out / "panorama.png") and outputs["exr"] == str(out / "panorama.exr")
    assert outputs["metadata"] == str(out / "metadata.json")
    assert outputs["faces"] == {face: str(out / f"face_{face}.png") for face in FACES}
    assert outputs["dice"] == str(out / "cubemap_dice.png") and outputs["horizon"] == str(out / "cubemap_horizon.png")
    json.dumps(done_event("job", outputs))

    def read(path):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            return np.asarray(image)

    panorama = read(outputs["png"])
    faces = {face: read(path) for face, path in outputs["faces"].items()}
    assert all(face.shape == (128, 128, 3) for face in faces.values())  # W / 4
    # Cut from the written PNG's pixels with our geometry, then rounded to 8 bits.
    reference = equirect_to_cube_faces(panorama.astype(np.float32) / 255.0, 128)
    for face in FACES:
        np.testing.assert_array_equal(faces[face], to_uint8(reference[face]))
    dice, horizon = read(outputs["dice"]), read(outputs["horizon"])
    assert dice.shape == (384, 512, 3) and horizon.shape == (128, 768, 3)
    np.testing.assert_array_equal(dice, faces_to_dice(faces))
    np.testing.assert_array_equal(horizon, faces_to_horizon(faces))
    # One way to cut a cube map: the `cubemap` command on panorama.png writes the same bytes.
    exported = write_cubemap(outputs["png"], str(tmp_path / "exported"))
    for name, path in exported.items():
        assert (out / name).read_bytes() == open(path, "rb").read()


@pytest.mark.parametrize("layout,width,height", [("wide", 256, 128), ("tile", 128, 128)])
def test_wide_and_tile_jobs_write_no_cube_map(tiny_model, tmp_path, layout, width, height):
    out = tmp_path / "out"
    outputs = _job(tiny_model, out, layout, width, height)
    assert sorted(outputs) == ["exr", "metadata", "png"]
    assert sorted(os.listdir(out)) == ["metadata.json", "panorama.exr", "panorama.png"]


def test_failure_while_writing_a_cube_face_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import backend.products.images

    real_write_png = backend.products.images.write_png

    def fail_on_face_u(path, image, **options):
        if "face_U" in os.path.basename(path):
            raise OSError("disk full")
        real_write_png(path, image, **options)

    monkeypatch.setattr(backend.products.images, "write_png", fail_on_face_u)
    out = tmp_path / "out"
    with pytest.raises(SyncSphereError, match="disk full"):
        _job(tiny_model, out, "equirect", 256, 128)
    assert os.listdir(tmp_path) == []  # not even panorama.png, written before the faces


def test_existing_cube_map_files_need_overwrite_for_equirect_jobs_only(tiny_model, tmp_path, capsys):
    from backend.errors import BadRequest
    from backend.products.files import check_output_folder
    from backend.products.outputs import job_output_names

    out = tmp_path / "out"
    out.mkdir()
    (out / "cubemap_horizon.png").write_bytes(b"the user's file")
    assert main(["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "equirect"]) == 2
    assert "cubemap_horizon.png already exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(BadRequest, match="cubemap_horizon.png already exists; pass --overwrite"):
        check_output_folder(str(out), job_output_names("equirect"), overwrite=False)
    assert check_output_folder(str(out), job_output_names("equirect"), overwrite=True) == str(out)
    check_output_folder(str(out), job_output_names("tile"), overwrite=False)  # a tile job does not write it
    assert job_output_names("wide") == ["panorama.png", "panorama.exr", "metadata.json"]
    assert (out / "cubemap_horizon.png").read_bytes() == b"the user's file"
