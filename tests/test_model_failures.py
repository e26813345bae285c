"""Models that fail: a failed load never spoils the worker's cached model, and every broken model, LoRA or
model id is told apart in one sentence before anything loads.

Everything here is real: tiny random models loaded by diffusers, corrupt files written byte by byte, the stdio
worker as a subprocess, a Hugging Face cache filled by huggingface_hub from tests/hub_server.py.
"""

import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.app.cli import main
from backend.app.job import check_request
from backend.engine.models import ModelCache, resolve_lora_source, resolve_model_source
from backend.errors import BadRequest, ModelNotFound
from backend.request import GenerateRequest
from hub_server import HubServer
from ldm_checkpoint import write_ldm_single_file
from model_factory import TINY_UNET, save_random_lora, save_random_sd_model
from test_server import params, worker  # noqa: F401  (worker: the real stdio worker fixture)

UNREADABLE = "is not a readable safetensors file (it is truncated or not safetensors: "
CLI_JOB = ["--prompt", "x", "--seed", "1", "--layout", "wide", "--width", "256", "--height", "128", "--window", "16",
           "--steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """Model A (the session's tiny model), model B (same architecture, other weights), a LoRA that fits them
    and one built for a UNet with other channel counts, which fits neither."""
    folder = tmp_path_factory.mktemp("failures")
    other = save_random_sd_model(str(folder / "other"), unet_config={**TINY_UNET, "block_out_channels": (8, 16)})
    return {
        "A": tiny_model,
        "B": save_random_sd_model(str(folder / "B"), seed=10),
        "lora": save_random_lora(str(folder / "lora"), tiny_model),
        "misfit_lora": save_random_lora(str(folder / "misfit-lora"), other),
    }


def _random_bytes(path) -> str:
    path.write_bytes(random.Random(0).randbytes(4096))  # its first 8 bytes read as a header length past the end
    return str(path)


def _truncated(source: str, path) -> str:
    data = open(source, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _not_a_model(path) -> str:
    """A sound safetensors file that holds no Stable Diffusion weights: it passes the header check, and the
    load itself fails."""
    save_file({"weight": torch.zeros(3)}, str(path))
    return str(path)


# --- the worker's cached model ---------------------------------------------------------------------------


def _job(worker, out_dir, model, **overrides) -> dict:
    """Run one job on ``worker``; returns its last event (done or error)."""
    worker.send({"op": "generate", "job": out_dir.name, "params": params(model, **overrides), "out_dir": str(out_dir)})
    return worker.until(lambda event: event["event"] in ("done", "error") and event["job"] == out_dir.name)[-1]


def test_a_failed_load_leaves_the_cached_model_working(worker, models, tmp_path):
    first = _job(worker, tmp_path / "first", models["A"])
    assert first["event"] == "done"
    # Refused by its header before it loads (the messages: test_a_corrupt_checkpoint_is_called_corrupt_not_pickled).
    corrupt = _job(worker, tmp_path / "corrupt", _random_bytes(tmp_path / "corrupt.safetensors"))
    assert corrupt["event"] == "error" and corrupt["kind"] == "bad_request"
    broken = _job(worker, tmp_path / "broken", _not_a_model(tmp_path / "not-a-model.safetensors"))
    assert broken["event"] == "error" and broken["kind"] == "bad_request" and "could not be loaded" in broken["message"]
    again = _job(worker, tmp_path / "again", models["A"])
    assert again["event"] == "done", again
    assert (tmp_path / "again" / "panorama.png").read_bytes() == (tmp_path / "first" / "panorama.png").read_bytes()


def test_a_lora_that_does_not_fit_leaves_the_cached_model_intact(worker, models, tmp_path):
    assert _job(worker, tmp_path / "a", models["A"])["event"] == "done"
    misfit = _job(worker, tmp_path / "b-misfit", models["B"], lora=models["misfit_lora"])
    assert misfit["event"] == "error" and misfit["kind"] == "bad_request" and "do not fit" in misfit["message"]
    assert _job(worker, tmp_path / "a-again", models["A"])["event"] == "done"
    assert _job(worker, tmp_path / "b", models["B"])["event"] == "done"
    image = {name: (tmp_path / name / "panorama.png").read_bytes() for name in ("a", "a-again", "b")}
    assert image["a-again"] == image["a"]  # A's weights, not B's
    assert image["b"] != image["a"]  # B draws another image, so the check above tells the two apart


def _checked(model: str, out, **overrides):
    return check_request(GenerateRequest.from_params({**params(model, **overrides), "out": str(out)}))


def _state(model) -> dict:
    return {f"{name}.{key}": value.detach().cpu().clone() for name in ("unet", "vae", "text_encoder")
            for key, value in getattr(model.pipeline, name).state_dict().items()}


def _same_weights(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def test_the_model_cache_keeps_its_model_when_a_load_or_a_fuse_fails(models, tmp_path):
    cache = ModelCache()
    model_a = cache.get(_checked(models["A"], tmp_path / "a"))
    weights = _state(model_a)
    with pytest.raises(BadRequest, match="could not be loaded"):
        cache.get(_checked(_not_a_model(tmp_path / "not-a-model.safetensors"), tmp_path / "broken"))
    assert cache.get(_checked(models["A"], tmp_path / "a")) is model_a
    with pytest.raises(BadRequest, match="do not fit"):
        cache.get(_checked(models["B"], tmp_path / "b", lora=models["misfit_lora"]))
    assert cache.get(_checked(models["A"], tmp_path / "a")) is model_a
    assert _same_weights(_state(model_a), weights)
    # A LoRA that fits changes the entry: only a complete model replaces it.
    fused = cache.get(_checked(models["A"], tmp_path / "a", lora=models["lora"]))
    assert fused is not model_a and not _same_weights(_state(fused), weights)


def _devices(model) -> dict:
    return {name: next(getattr(model.pipeline, name).parameters()).device.type
            for name in ("unet", "vae", "text_encoder")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_previous_model_waits_in_cpu_memory(models, tmp_path):
    from backend.engine.memory import StagePlacement

    on_gpu = dict(device="cuda", dtype="float32")
    cache = ModelCache()
    torch.cuda.synchronize()
    empty = torch.cuda.memory_allocated()
    model_a = cache.get(_checked(models["A"], tmp_path / "a", **on_gpu))
    assert set(_devices(model_a).values()) == {"cuda"}
    size = torch.cuda.memory_allocated() - empty  # B, of the same architecture, takes as much
    torch.cuda.reset_peak_memory_stats()
    with pytest.raises(BadRequest, match="do not fit"):
        cache.get(_checked(models["B"], tmp_path / "b", lora=models["misfit_lora"], **on_gpu))
    assert torch.cuda.max_memory_allocated() - empty < 1.5 * size  # B loaded while A was in CPU memory
    assert set(_devices(model_a).values()) == {"cpu"}
    assert cache.get(_checked(models["A"], tmp_path / "a", **on_gpu)) is model_a
    assert set(_devices(model_a).values()) == {"cuda"}

    # A low-memory job leaves its models in CPU memory but the last stage's: each goes back where it was.
    low = ModelCache()
    model_low = low.get(_checked(models["A"], tmp_path / "a", memory="low", **on_gpu))
    StagePlacement(model_low.pipeline, torch.device("cuda"), offload=True).enter("decode")
    placed = _devices(model_low)
    assert placed == {"unet": "cpu", "vae": "cuda", "text_encoder": "cpu"}
    with pytest.raises(BadRequest, match="do not fit"):
        low.get(_checked(models["B"], tmp_path / "b", memory="low", lora=models["misfit_lora"], **on_gpu))
    assert set(_devices(model_low).values()) == {"cpu"}
    assert low.get(_checked(models["A"], tmp_path / "a", memory="low", **on_gpu)) is model_low
    assert _devices(model_low) == placed


# --- what is wrong with a model, told before it loads ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> str:
    return write_ldm_single_file(tiny_model, str(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"))


def test_a_corrupt_checkpoint_is_called_corrupt_not_pickled(checkpoint, tmp_path):
    for path in (_random_bytes(tmp_path / "random.safetensors"), _truncated(checkpoint, tmp_path / "cut.safetensors")):
        with pytest.raises(BadRequest) as refused:
            resolve_model_source(path)
        assert str(refused.value).startswith(f"The checkpoint {path} {UNREADABLE}")
        assert "pickle" not in str(refused.value)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(BadRequest, match="only 0 bytes long"):
        resolve_model_source(str(tmp_path / "empty.safetensors"))
    assert resolve_model_source(checkpoint).kind == "single_file"


def test_a_corrupt_checkpoint_is_refused_before_loading(tmp_path, capsys):
    model = _random_bytes(tmp_path / "random.safetensors")
    assert main(["generate", "--model", model, "--out", str(tmp_path / "out"), *CLI_JOB]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: The checkpoint {model} {UNREADABLE}"
                                                           f"its header would be {_header_length(model)} bytes long, "
                                                           "but the file has 4096)."]


def _header_length(path: str) -> int:
    return int.from_bytes(open(path, "rb").read(8), "little")


def _copy_without(tiny_model: str, folder, component: str, pickled: bool):
    """A copy of ``tiny_model`` whose ``component`` has no safetensors weights (pickled ones with ``pickled``)."""
    shutil.copytree(tiny_model, folder)
    weights = next((folder / component).glob("*.safetensors"))
    if pickled:
        torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    return str(folder)


def test_a_folder_is_told_what_its_weights_lack(tiny_model, checkpoint, tmp_path):
    weightless = _copy_without(tiny_model, tmp_path / "weightless", "unet", pickled=False)
    with pytest.raises(BadRequest) as refused:
        resolve_model_source(weightless)
    assert str(refused.value) == (f"The model folder {weightless} has no weights for its unet "
                                  "(no .safetensors or pickled files).")

    pickled = _copy_without(tiny_model, tmp_path / "pickled", "unet", pickled=True)
    with pytest.raises(BadRequest, match="no .safetensors weights for its unet; its pickled weights can run code"):
        resolve_model_source(pickled)
    assert resolve_model_source(pickled, allow_pickle=True).kind == "folder"

    corrupt = shutil.copytree(tiny_model, tmp_path / "corrupt")
    weights = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    _truncated(str(weights), weights)
    with pytest.raises(BadRequest, match=f"The weights file {weights} {UNREADABLE.replace('(', '[(]')}"):
        resolve_model_source(str(corrupt))

    os.makedirs(tmp_path / "checkpoints")
    shutil.copy(checkpoint, tmp_path / "checkpoints")
    with pytest.raises(BadRequest, match="is not a diffusers model"):
        resolve_model_source(str(tmp_path / "checkpoints"))


# --- LoRA weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", ["random bytes", "truncated", "truncated in a folder"])
def test_a_corrupt_lora_is_one_sentence_exit_2_before_loading(models, tmp_path, capsys, make):
    lora = os.path.join(models["lora"], "pytorch_lora_weights.safetensors")
    if make == "random bytes":
        path = given = _random_bytes(tmp_path / "x.safetensors")
    else:
        (tmp_path / "folder").mkdir()
        path = _truncated(lora, tmp_path / "folder" / "w.safetensors")
        given = path if make == "truncated" else str(tmp_path / "folder")
    code = main(["generate", "--model", models["A"], "--lora", given, "--out", str(tmp_path / "out"), *CLI_JOB])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1  # one sentence, and no "loading…" before it
    assert error[0].startswith(f"error: The LoRA file {path} {UNREADABLE}")
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_lora_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFound) as refused:
        resolve_lora_source("someone/some-lora")
    assert str(refused.value) == (
        "The LoRA someone/some-lora is not in the local Hugging Face cache and the hub cannot be reached; "
        "download it once with network access or point --lora at a local .safetensors file.")


def test_a_cached_hub_lora_loads_offline(models, tmp_path, monkeypatch):
    from huggingface_hub import constants, hf_hub_download

    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:  # fetched once, online, the way diffusers would fetch it
        hub.add_repo("syncsphere-test/tiny-lora", models["lora"])
        hf_hub_download("syncsphere-test/tiny-lora", "pytorch_lora_weights.safetensors", endpoint=hub.url,
                        cache_dir=cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name, lora in (("hub", "syncsphere-test/tiny-lora"), ("local", models["lora"])):
        assert main(["generate", "--model", models["A"], "--lora", lora, "--out", str(tmp_path / name), *CLI_JOB]) == 0
    assert (tmp_path / "hub" / "panorama.png").read_bytes() == (tmp_path / "local" / "panorama.png").read_bytes()


# --- model ids on the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["download", "remove"])
def test_help_is_help_and_an_option_where_the_id_belongs_is_named(command, capsys):
    with pytest.raises(SystemExit) as help_exit:
        main(["models", command, "--help"])
    assert help_exit.value.code == 0 and "ID" in capsys.readouterr().out

    with pytest.raises(SystemExit) as option_exit:
        main(["models", command, "-x"])
    assert option_exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: -x is not an option of python -m backend models {command}, and a hub id never starts with '-' "
        "(--help lists the options)."]

    assert main(["models", command, "--", "--help"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --help is not a Hugging Face hub id (like stabilityai/stable-diffusion-2-base): hub ids never start "
        "with '-'."]
