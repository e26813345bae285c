"""The model manager (backend/engine/model_manager.py, ``python -m backend models``) against a local hub.

No network: tests/hub_server.py serves a tiny Stable Diffusion 2-architecture model (random weights) through
the hub's file API on 127.0.0.1, and each test points ``HF_ENDPOINT`` at it and ``HF_HUB_CACHE`` at a tmp
folder. huggingface_hub reads ``HF_HUB_OFFLINE`` (which conftest sets) once, at import: the tests that
download switch its constant off as well as the variable.
"""

import json
import os
import shutil
import socket

import pytest
import torch

from backend.app.cli import _Parser
from backend.errors import BadRequest, JobCancelled, ModelNotFound
from backend.engine.model_manager import (
    check_model_folder,
    download_model,
    list_models,
    remove_model,
    select_engine_files,
    weights_variant,
)
from backend.app.models_cli import add_models_command, run_models_command
from hub_server import HubServer

REPO = "syncsphere-test/tiny-sd2"
ENGINE_FILES = [  # what the engine loads of the served model, in download order
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
NOT_FOR_THE_ENGINE = [  # served too, never downloaded
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "v2-base.ckpt",
    "README.md",
]


def _save_fp16_copy(source: str, target: str) -> None:
    from safetensors.torch import load_file, save_file

    save_file({name: tensor.half() for name, tensor in load_file(source).items()}, target)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> str:
    """A tiny SD 2-architecture model (UNet cross-attention width 1024) plus files the engine must not fetch."""
    from model_factory import TINY_UNET, save_random_sd_model

    folder = save_random_sd_model(str(tmp_path_factory.mktemp("served") / "tiny-sd2"),
                                  unet_config=dict(TINY_UNET, cross_attention_dim=1024))
    unet, text = os.path.join(folder, "unet"), os.path.join(folder, "text_encoder")
    _save_fp16_copy(os.path.join(unet, "diffusion_pytorch_model.safetensors"),
                    os.path.join(unet, "diffusion_pytorch_model.fp16.safetensors"))
    _save_fp16_copy(os.path.join(text, "model.safetensors"), os.path.join(text, "model.fp16.safetensors"))
    shutil.copy(os.path.join(unet, "diffusion_pytorch_model.safetensors"),
                os.path.join(unet, "diffusion_pytorch_model.non_ema.safetensors"))
    for pickled in ("unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin", "v2-base.ckpt"):
        with open(os.path.join(folder, pickled), "wb") as f:
            f.write(os.urandom(50_000))
    os.makedirs(os.path.join(folder, "safety_checker"))
    with open(os.path.join(folder, "safety_checker", "config.json"), "w") as f:
        json.dump({"model_type": "clip"}, f)
    with open(os.path.join(folder, "safety_checker", "model.safetensors"), "wb") as f:
        f.write(os.urandom(30_000))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("# tiny\n")
    served = {os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
              for root, _, names in os.walk(folder) for name in names}
    assert served == set(ENGINE_FILES) | set(NOT_FOR_THE_ENGINE)
    return folder


def _size(folder: str, names) -> int:
    return sum(os.path.getsize(os.path.join(folder, *name.split("/"))) for name in names)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads on: HF_HUB_OFFLINE off (the variable and huggingface_hub's constant), the cache in tmp."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)  # what diffusers' loading reads
    return cache


@pytest.fixture
def hub(served_model, online, monkeypatch):
    with HubServer() as server:
        server.add_repo(REPO, served_model)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total, current):
        self.calls.append((done, total, current))
        return False


def _models_cli(argv) -> int:
    parser = _Parser(prog="python -m backend")
    add_models_command(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return run_models_command(parser.parse_args(argv))


def _by_id(models):
    return {model.id: model for model in models}


# --- which files ------------------------------------------------------------------------------------


SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "requires_safety_checker": True}
SD15_FILES = [  # the file list of stable-diffusion-v1-5, abridged
    "model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
]
SD15_CONFIGS = ["model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "vae/config.json"]


def test_only_configs_and_one_safetensors_variant_per_component_are_chosen():
    assert select_engine_files(SD15_FILES, SD15_INDEX) == SD15_CONFIGS + [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]
    # fp16 where the repo has it (text encoder, UNet), the plain weights elsewhere (VAE).
    assert select_engine_files(SD15_FILES, SD15_INDEX, fp16=True) == SD15_CONFIGS + [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]


def test_sharded_weights_come_with_their_index_and_pickled_only_components_are_refused():
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    files = ["model_index.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
             "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
             "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
             "text_encoder_2/model.fp16-00002-of-00002.safetensors", "text_encoder_2/pytorch_model.bin.index.json"]
    assert select_engine_files(files, index) == [
        "model_index.json", "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json"]
    assert select_engine_files(files, index, fp16=True)[2:] == [
        "text_encoder_2/model.fp16-00001-of-00002.safetensors", "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.fp16.json"]
    assert [weights_variant(name) for name in files[3:6]] == [None, None, "fp16"]
    with pytest.raises(BadRequest, match="no .safetensors weights for its unet"):
        select_engine_files(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"],
                            {"unet": ["diffusers", "UNet2DConditionModel"]}, model_id="old/model")


# --- download ---------------------------------------------------------------------------------------


def test_download_fetches_only_what_the_engine_loads_with_progress_in_order(hub, served_model, online, monkeypatch):
    progress = Recorder()
    result = download_model(REPO, progress=progress)

    total = _size(served_model, ENGINE_FILES)
    assert sorted(result.files) == sorted(ENGINE_FILES) and result.bytes_total == total
    assert result.fetched == total == hub.bytes_sent
    fetched = {path.split("/resolve/", 1)[1].split("/", 1)[1] for path in hub.downloaded()}
    assert fetched == set(ENGINE_FILES)  # no .bin, .ckpt, fp16 or non_ema file, no safety checker

    dones = [done for done, _, _ in progress.calls]
    assert dones == sorted(dones)  # bytes never go backwards
    assert {t for _, t, _ in progress.calls} == {total}
    assert dones[0] == os.path.getsize(os.path.join(served_model, "model_index.json"))  # fetched before the total is known
    assert progress.calls[-1] == (total, total, None)
    started = [current for _, _, current in progress.calls if current]
    assert list(dict.fromkeys(started)) == ENGINE_FILES[1:]  # each file reported, in download order

    (model,) = list_models()
    assert (model.id, model.kind, model.complete, model.missing) == (REPO, "hub", True, [])
    assert (model.family, model.architecture, model.size, model.variant) == ("SD2", "SD2", total, None)
    assert model.path == result.path

    # A second download has nothing to fetch.
    hub.reset_counters()
    again = download_model(REPO)
    assert again.fetched == 0 and hub.bytes_sent == 0 and again.path == result.path

    # The engine loads it from the cache by hub id, offline.
    from backend.engine.models import load_model, resolve_model_source

    _go_offline(monkeypatch)
    hub.reset_counters()
    loaded = load_model(resolve_model_source(REPO), torch.device("cpu"), torch.float32)
    assert loaded.pipeline.unet.config.cross_attention_dim == 1024
    assert hub.requests == []


def test_fp16_download_takes_the_half_precision_variant_where_there_is_one(hub, served_model, monkeypatch):
    result = download_model(REPO, fp16=True)
    expected = [name for name in ENGINE_FILES if name not in (
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors")]
    expected += ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert sorted(result.files) == sorted(expected)
    assert result.bytes_total == _size(served_model, expected) == hub.bytes_sent
    # The VAE has no fp16 variant: its plain weights came. The engine loads this with variant="fp16".
    assert result.variant == "fp16"
    (model,) = list_models()
    assert model.complete and model.variant == "fp16"
    # ... and the engine does: offline, from the cache, the fp16 UNet and the plain VAE.
    from backend.engine.models import load_model, resolve_model_source

    _go_offline(monkeypatch)
    hub.reset_counters()
    loaded = load_model(resolve_model_source(REPO), torch.device("cpu"), torch.float32)
    assert loaded.pipeline.unet.dtype == torch.float32 and hub.requests == []


def test_a_dropped_connection_fails_in_one_sentence_then_the_download_resumes(hub, served_model):
    hub.cut_next_download("unet/diffusion_pytorch_model.safetensors", then_down=True)
    with pytest.raises(ModelNotFound) as failure:
        download_model(REPO)
    message = str(failure.value)
    assert "\n" not in message and REPO in message and "unet/diffusion_pytorch_model.safetensors" in message
    assert "again resumes" in message

    (model,) = list_models()
    assert not model.complete and model.missing == ["unet weights", "vae weights"]
    assert model.family == "SD2"  # the configs came first

    hub.bring_up()
    hub.reset_counters()
    progress = Recorder()
    result = download_model(REPO, progress=progress)
    total = _size(served_model, ENGINE_FILES)
    rest = _size(served_model, ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"])
    assert result.fetched == hub.bytes_sent == rest < total  # the text encoder and configs were kept
    assert progress.calls[0][0] == total - rest and progress.calls[-1] == (total, total, None)
    (model,) = list_models()
    assert model.complete and model.size == total


def test_a_connection_dropped_once_is_resumed_within_the_same_download(hub, served_model):
    hub.cut_next_download("unet/diffusion_pytorch_model.safetensors")
    progress = Recorder()
    result = download_model(REPO, progress=progress)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert sum(path.endswith(unet) for path in hub.downloaded()) == 2  # huggingface_hub asked again
    dones = [done for done, _, _ in progress.calls]
    assert dones == sorted(dones) and dones[-1] == result.bytes_total
    assert list_models()[0].complete


def test_cancelling_from_the_progress_callback_keeps_the_finished_files(hub):
    def cancel_at_the_unet(done, total, current):
        return current == "unet/diffusion_pytorch_model.safetensors"

    with pytest.raises(JobCancelled, match="cancelled"):
        download_model(REPO, progress=cancel_at_the_unet)
    assert list_models()[0].missing == ["unet weights", "vae weights"]
    assert download_model(REPO).fetched > 0 and list_models()[0].complete


def test_an_interrupted_blob_is_counted_cleared_by_the_next_download_and_freed_by_remove(hub, served_model, online):
    download_model(REPO)
    total = _size(served_model, ENGINE_FILES)
    blobs = os.path.join(online, "models--syncsphere-test--tiny-sd2", "blobs")
    leftover = os.path.join(blobs, "0123abcd.4567ef89.incomplete")  # what a killed download leaves
    with open(leftover, "wb") as f:
        f.write(b"x" * 1000)
    # Every file the engine loads is there: complete, with the leftover counted in the size.
    (model,) = list_models()
    assert model.complete and model.size == total + 1000
    # A download that completes (here fetching nothing) deletes it, unless a download holds its lock.
    from filelock import FileLock

    with FileLock(os.path.join(online, ".locks", "models--syncsphere-test--tiny-sd2", "0123abcd.lock")):
        download_model(REPO)
        assert os.path.exists(leftover)
    assert download_model(REPO).fetched == 0 and not os.path.exists(leftover) and list_models()[0].size == total

    # With files missing, the interrupted blob is named among them.
    os.remove(os.path.join(list_models()[0].path, "unet", "diffusion_pytorch_model.safetensors"))
    with open(leftover, "wb") as f:
        f.write(b"x" * 1000)
    (model,) = list_models()
    assert not model.complete and model.missing == ["unet weights", "an interrupted download (.incomplete)"]

    assert remove_model(REPO) == model.size
    assert not os.path.exists(os.path.join(online, "models--syncsphere-test--tiny-sd2"))
    assert list_models() == []
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        remove_model(REPO)


def test_remove_refuses_a_folder_the_user_pointed_at(tiny_model, online):
    with pytest.raises(BadRequest, match="local path") as refusal:
        remove_model(tiny_model)
    assert "\n" not in str(refusal.value)
    assert os.path.isfile(os.path.join(tiny_model, "model_index.json"))
    with pytest.raises(BadRequest, match="local path"):
        download_model(tiny_model)


# --- errors -----------------------------------------------------------------------------------------


def test_offline_and_not_cached_names_the_model_and_how_to_point_at_a_folder(online, monkeypatch):
    _go_offline(monkeypatch)
    with pytest.raises(ModelNotFound) as failure:
        download_model("stabilityai/stable-diffusion-2-base")
    message = str(failure.value)
    assert "stabilityai/stable-diffusion-2-base" in message and "--model PATH" in message and "HF_HUB_OFFLINE" in message


def test_an_unreachable_hub_says_so_unless_the_model_is_cached(hub, online, monkeypatch):
    download_model(REPO)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    assert download_model(REPO).fetched == 0  # complete in the cache: nothing to do
    with pytest.raises(ModelNotFound, match="other/model is not in the local Hugging Face cache and the hub cannot be reached"):
        download_model("other/model")


def test_gated_and_unknown_models_say_a_token_is_needed_and_where_it_goes(hub):
    hub.gated.add(REPO)
    with pytest.raises(ModelNotFound) as gated:
        download_model(REPO)
    for words in (REPO, "gated", "huggingface-cli login", "HF_TOKEN"):
        assert words in str(gated.value)
    with pytest.raises(ModelNotFound) as missing:
        download_model("syncsphere-test/private-or-missing")
    for words in ("syncsphere-test/private-or-missing", "not found", "HF_TOKEN"):
        assert words in str(missing.value)
    assert list_models() == []


# --- families of local models -----------------------------------------------------------------------


def _configs_only(folder, class_name="StableDiffusionPipeline", unet=None, scheduler=None):
    index = {"_class_name": class_name, "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for name, config in (("unet/config.json", unet or {}), ("vae/config.json", {}),
                         ("scheduler/scheduler_config.json", scheduler or {"_class_name": "DDIMScheduler"}),
                         ("model_index.json", index)):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(config, f)


def test_local_folders_are_listed_with_their_family_read_from_the_configs(tmp_path, tiny_model, online):
    from safetensors.torch import save_file

    models = tmp_path / "models"
    _configs_only(str(models / "sd1"), unet={"cross_attention_dim": 768})
    _configs_only(str(models / "sd2"), unet={"cross_attention_dim": 1024})
    _configs_only(str(models / "sdxl"), class_name="StableDiffusionXLPipeline", unet={"cross_attention_dim": 2048})
    _configs_only(str(models / "lcm"), unet={"cross_attention_dim": 768, "time_cond_proj_dim": 256},
                  scheduler={"_class_name": "LCMScheduler"})
    _configs_only(str(models / "turbo"), unet={"cross_attention_dim": 1024},
                  scheduler={"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"})
    shutil.copytree(tiny_model, models / "tiny")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(4, 1024, dtype=torch.float16)}, str(models / "checkpoint.safetensors"))

    found = _by_id(list_models(model_folders=[str(models)]))
    families = {os.path.basename(path): (model.family, model.architecture) for path, model in found.items()}
    assert families == {"sd1": ("SD1", "SD1"), "sd2": ("SD2", "SD2"), "sdxl": ("SDXL", "SDXL"),
                        "lcm": ("LCM", "SD1"), "turbo": ("Turbo", "SD2"), "tiny": (None, None),
                        "checkpoint.safetensors": ("SD2", "SD2")}
    assert found[str(models / "sd1")].missing == ["unet weights", "vae weights"]  # configs only: partial
    tiny = found[str(models / "tiny")]
    assert tiny.complete and tiny.kind == "folder" and tiny.size > 0
    assert found[str(models / "checkpoint.safetensors")].kind == "single_file"
    assert check_model_folder(str(models / "tiny")).complete
    with pytest.raises(BadRequest, match="does not exist"):
        list_models(model_folders=[str(tmp_path / "nowhere")])


# --- the command line -------------------------------------------------------------------------------


def test_the_cli_prints_json_progress_events_then_done_and_lists_and_removes(hub, served_model, capsys):
    assert _models_cli(["models", "download", REPO, "--json-progress"]) == 0
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    progress, done = events[:-1], events[-1]
    total = _size(served_model, ENGINE_FILES)
    assert all(event["event"] == "progress" and event["stage"] == "downloading" and event["total"] == total
               and event["model"] == REPO and event["job"] is None for event in progress)
    steps = [event["step"] for event in progress]
    assert steps == sorted(steps) and steps[-1] == total and progress[-1]["file"] is None
    assert done == {"event": "done", "job": None, "outputs": {"model": list_models()[0].path}}
    assert "downloaded" in err

    assert _models_cli(["models", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["size"], listed["family"], listed["complete"]) == (REPO, total, "SD2", True)
    assert _models_cli(["models", "list"]) == 0
    assert REPO in capsys.readouterr().out

    assert _models_cli(["models", "remove", REPO]) == 0
    assert "freeing" in capsys.readouterr().err
    assert _models_cli(["models", "remove", REPO]) == 2
    assert capsys.readouterr().err.startswith("error: The model")


def test_cli_errors_are_one_sentence_with_exit_code_2_and_an_error_event(online, monkeypatch, capsys):
    _go_offline(monkeypatch)
    assert _models_cli(["models", "download", "someone/some-model", "--json-progress"]) == 2
    out, err = capsys.readouterr()
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert event["event"] == "error" and event["kind"] == "model_not_found" and "someone/some-model" in event["message"]
    assert err.startswith("error: The model someone/some-model") and err.count("\n") == 1


def test_a_generation_downloads_a_missing_model_with_progress_events(hub, online, tiny_model):
    """The engine downloads a hub model it does not have before loading it, reporting stage "downloading"
    in bytes, then generates as usual; a second generation finds it cached and downloads nothing."""
    import subprocess
    import sys

    repo = "syncsphere-test/tiny-sd"
    hub.add_repo(repo, tiny_model)  # a model that generates (the served SD2 one only has SD2's configs)
    everything = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(tiny_model) for name in names)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": online, "HF_HUB_OFFLINE": "0", "PYTHONPATH": repo_root}

    def generate(out):
        done = subprocess.run([sys.executable, "-m", "backend", "generate", "--prompt", "x", "--model", repo, "--out", out,
                               "--layout", "wide", "--width", "256", "--height", "128", "--window", "16", "--steps", "1",
                               "--device", "cpu", "--json-progress"], capture_output=True, text=True, env=env, cwd=repo_root)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines()]

    events = generate(os.path.join(online, "..", "first"))
    stages = [event["stage"] for event in events if event["event"] == "progress"]
    downloading = [event for event in events if event.get("stage") == "downloading"]
    assert downloading and stages.index("loading") > max(i for i, stage in enumerate(stages) if stage == "downloading")
    steps = [event["step"] for event in downloading]
    assert steps == sorted(steps) and steps[-1] == downloading[-1]["total"] == everything  # the tiny model is only what the engine loads
    assert events[-1]["event"] == "done"
    hub.reset_counters()
    events = generate(os.path.join(online, "..", "second"))
    assert not any(event.get("stage") == "downloading" for event in events) and events[-1]["event"] == "done"
