"""Model sources, device and dtype choice, and schedulers other than DDIM."""

import pytest
import torch
from safetensors.torch import save_file

from backend.app.cli import main
from backend.errors import BadRequest
from backend.engine.models import read_model_geometry, resolve_device, resolve_dtype, resolve_model_source


def test_model_sources_are_told_apart(tiny_model, tmp_path):
    assert resolve_model_source("stabilityai/stable-diffusion-2-base").kind == "hub"
    assert resolve_model_source(tiny_model).kind == "folder"
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))  # only its header is read here
    assert resolve_model_source(str(tmp_path / "model.safetensors")).kind == "single_file"
    (tmp_path / "model.bin").write_bytes(b"")
    assert resolve_model_source(str(tmp_path / "model.bin"), allow_pickle=True).kind == "single_file"
    with pytest.raises(BadRequest, match="pickled"):
        resolve_model_source(str(tmp_path / "model.bin"))
    with pytest.raises(BadRequest, match="model_index.json"):
        resolve_model_source(str(tmp_path))


def test_geometry_comes_from_the_configs(tiny_model):
    geometry = read_model_geometry(resolve_model_source(tiny_model))
    assert (geometry.vae_scale_factor, geometry.latent_channels, geometry.sample_size) == (8, 4, 32)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(BadRequest, match="no CUDA GPU"):
        resolve_device("cuda")


def test_auto_dtype_is_half_on_gpus_and_float_on_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("scheduler", ["euler-a", "dpm++", "EulerDiscreteScheduler"])
def test_other_schedulers_run_and_repeat(tiny_model, tmp_path, scheduler):
    args = ["generate", "--prompt", "a desert", "--model", tiny_model, "--layout", "equirect", "--width", "256",
            "--height", "128", "--steps", "3", "--window", "16", "--stride", "8", "--seed", "2", "--device", "cpu",
            "--scheduler", scheduler]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "panorama.png").read_bytes() == (tmp_path / "b" / "panorama.png").read_bytes()
