"""--quantize int8 (issue 20's memory): torchao's weight-only int8 on the denoiser and the text encoders, the sizes the
memory plan reads before and after loading, the image it paints, and its refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from backend.app.cli import main
from backend.engine import memory
from backend.engine.models import (
    QUANTIZE_NEEDS_TORCHAO,
    component_weight_bytes,
    load_model,
    quantize_weights,
    resolve_model_source,
)
from model_factory import save_random_sd3_model
from test_cli import run_cli


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> str:
    return save_random_sd3_model(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


@pytest.mark.parametrize("family", ["SD2", "SD3"])
def test_int8_stores_the_linear_weights_in_a_byte_and_the_header_estimate_bounds_them(family, tiny_model, tiny_sd3):
    source = resolve_model_source(tiny_model if family == "SD2" else tiny_sd3)
    model = load_model(source, torch.device("cpu"), torch.float32)
    before = memory.component_bytes(model.pipeline)
    quantize_weights(model.pipeline, "int8")
    after = memory.component_bytes(model.pipeline)
    estimate = component_weight_bytes(source, torch.float32, "int8")
    denoiser = "unet" if family == "SD2" else "transformer"
    linear = next(module for module in model.pipeline.text_encoder.modules() if isinstance(module, torch.nn.Linear)).weight
    assert hasattr(linear, "__tensor_flatten__") and any(getattr(linear, name).dtype == torch.int8
                                                         for name in linear.__tensor_flatten__()[0])
    for name in ("text_encoder", denoiser):
        assert after[name] < 0.85 * before[name]  # int8 values and a scale per row in place of float32
        assert after[name] <= estimate[name] <= 1.5 * after[name]  # what the plan reads before loading: an upper bound
    assert after["vae"] == before["vae"] == estimate["vae"]  # the VAE keeps the job's dtype
    unquantised = component_weight_bytes(source, torch.float32)  # SD3's header also holds its position table (a buffer)
    assert unquantised == before if family == "SD2" else all(unquantised[name] >= before[name] for name in before)


def test_a_quantised_job_paints_close_to_the_float_one(toy_model, tmp_path):
    # One window of the development model (smooth skies and grounds), so the difference is the quantisation's alone.
    args = ["generate", "--model", toy_model, "--prompt", "noon grass", "--layout", "tile", "--width", "32",
            "--height", "32", "--steps", "8", "--seed", "3", "--no-hdr"]
    assert main(args + ["--out", str(tmp_path / "float")]) == 0
    assert main(args + ["--out", str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    float_image, int8_image = (np.asarray(Image.open(tmp_path / name / "panorama.png"), dtype=np.float64)
                               for name in ("float", "int8"))
    difference = np.abs(float_image - int8_image)
    assert 0 < difference.mean() <= 1.0 and difference.max() <= 8  # of 255; measured 0.24 and 2 on a world
    metadata = json.loads((tmp_path / "int8" / "metadata.json").read_text())
    assert metadata["params"]["quantize"] == "int8"


def test_an_sd3_job_runs_quantised(tiny_sd3, tmp_path):
    assert main(["generate", "--model", tiny_sd3, "--prompt", "x", "--layout", "wide", "--width", "256", "--height",
                 "128", "--steps", "2", "--seed", "1", "--no-hdr", "--quantize", "int8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "panorama.png").exists()


def test_quantise_refusals_are_one_sentence_before_anything_is_written(tiny_model, tmp_path):
    common = ["generate", "--model", tiny_model, "--prompt", "x", "--layout", "tile", "--width", "256", "--height", "256"]
    unknown = run_cli(*common, "--quantize", "int4", "--out", str(tmp_path / "a"))
    assert unknown.returncode == 2 and "--quantize" in unknown.stderr and not (tmp_path / "a").exists()
    # A backend Python without torchao: the module is hidden as if it were not installed.
    script = ("import sys; sys.modules['torchao'] = None; from backend.app.cli import main; "
              f"sys.exit(main({common + ['--quantize', 'int8', '--out', str(tmp_path / 'b')]!r}))")
    missing = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == f"error: {QUANTIZE_NEEDS_TORCHAO}"
    assert not (tmp_path / "b").exists()
