"""The preferences' Models list without Blender (blender_addon/core/model_list.py): parsing ``models list --json``,
sizes, the panel's model menu, and downloads, removals and listings run as the add-on runs them, through
``python -m backend models`` in a subprocess.

No network: tests/hub_server.py serves a tiny Stable Diffusion 2-architecture model (random weights) on
127.0.0.1; each backend process gets ``HF_ENDPOINT`` pointing at it and ``HF_HOME`` in a tmp folder. The
``stall`` fixture holds one file's download, so a download is reliably caught half-way.
"""

import json
import os
import sys
import threading
import time

import pytest

import hub_server
from hub_server import HubServer
from syncsphere.blender_addon.core import backend_command as commands
from syncsphere.blender_addon.core import generation, model_list
from test_addon_generation import settings as generation_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ID = "syncsphere-test/tiny-sd2"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def served_model(tmp_path_factory):
    """A tiny SD 2-architecture model (UNet cross-attention width 1024): family SD2. Every file is one the
    engine loads, so its download's total is the folder's size."""
    from model_factory import TINY_UNET, save_random_sd_model

    return save_random_sd_model(str(tmp_path_factory.mktemp("served") / "tiny-sd2"),
                                unet_config=dict(TINY_UNET, cross_attention_dim=1024))


def folder_size(folder, names=None):
    """Bytes of ``names`` (repo-relative) in ``folder``, or of every file in it."""
    if names is None:
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(folder) for name in files)
    return sum(os.path.getsize(os.path.join(folder, *name.split("/"))) for name in names)


@pytest.fixture
def hub(served_model):
    """The local hub serving the tiny model as MODEL_ID."""
    with HubServer() as server:
        server.add_repo(MODEL_ID, served_model)
        yield server


class Stall:
    """Holds the next download of the files in ``held`` (headers sent, no body) until ``release`` is set,
    then sends nothing more; ``reached`` is set once a held download has begun."""

    def __init__(self):
        self.held, self.reached, self.release = set(), threading.Event(), threading.Event()


@pytest.fixture
def stall(monkeypatch):
    """A Stall the local hub obeys for this test."""
    stall = Stall()
    original = hub_server._Handler._send_file

    def send_file(handler, served, filename, start, length):
        if filename not in stall.held:
            return original(handler, served, filename, start, length)
        stall.held.discard(filename)
        stall.reached.set()
        stall.release.wait(60)  # meanwhile the client is stopped: nothing is sent

    monkeypatch.setattr(hub_server._Handler, "_send_file", send_file)
    yield stall
    stall.release.set()


@pytest.fixture
def backend_env(tmp_path, hub):
    """The environment the add-on gives a backend process, with downloads from the local hub into a tmp
    HF_HOME (conftest turns the hub off for the test process; this process gets it back)."""
    env = commands.backend_environment(REPO, allow_network=True)
    env.pop("HF_HUB_CACHE", None)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    return env


def backend(*arguments):
    """The add-on's command line for ``python -m backend <arguments>`` with this interpreter."""
    return commands.backend_command(sys.executable, *arguments)


class RecordingDownload(model_list.ModelDownload):
    """A ModelDownload that keeps every event it handled, in order."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def _handle(self, event):
        self.seen.append(event)
        super()._handle(event)


def download(env, model_id=MODEL_ID, fp16=False, cls=RecordingDownload):
    """A started download of ``model_id`` as the add-on starts one."""
    job = cls(backend(*model_list.download_arguments(model_id, fp16)), env, REPO, model_id)
    job.start()
    return job


def listed(env, folders=()):
    """The installed models, as the Refresh button lists them."""
    return model_list.list_installed(backend(*model_list.list_arguments(folders)), env, REPO)


# --- parsing and texts -------------------------------------------------------------------------------


LISTING = """[
  {"id": "stabilityai/stable-diffusion-2-base", "kind": "hub", "path": "/cache/models--x/snapshots/abc",
   "size": 5210000000, "family": "SD2", "architecture": "SD2", "complete": true, "missing": [], "variant": null},
  {"id": "stabilityai/sdxl-turbo", "kind": "hub", "path": "/cache/models--y/snapshots/def", "size": 2400000000,
   "family": "Turbo", "architecture": "SDXL", "complete": false, "missing": ["unet weights", "vae weights"],
   "variant": null, "window_px": 512},
  {"id": "/models/my-lcm", "kind": "folder", "path": "/models/my-lcm", "size": 2100000000, "family": "LCM",
   "architecture": "SD1", "complete": true, "missing": [], "variant": "fp16"},
  {"id": "/models/old.safetensors", "kind": "single_file", "path": "/models/old.safetensors", "size": 350000000,
   "family": null, "architecture": null, "complete": true, "missing": [], "variant": null}
]"""


def test_the_listing_is_parsed_with_names_sizes_families_and_states():
    models = model_list.parse_model_list(LISTING)
    assert [model.label for model in models] == ["stabilityai/stable-diffusion-2-base", "stabilityai/sdxl-turbo",
                                                 "my-lcm", "old.safetensors"]
    assert [model.summary() for model in models] == [
        "5.2 GB, SD 2.x, 512 px views, about 4 GB of GPU memory, complete",
        "2.4 GB, SDXL Turbo, 512 px views, about 8 GB of GPU memory, partial: missing unet weights, vae weights",
        "2.1 GB, SD 1.x LCM, 512 px views, about 4 GB of GPU memory, complete, fp16",
        "350 MB, unknown family, 512 px views, complete",
    ]
    # Only cache entries can be removed: folders and files the user pointed at never are.
    assert [model.removable for model in models] == [True, True, False, False]
    assert model_list.parse_model_list("[]") == []


@pytest.mark.parametrize("text", ["", "{not json", '{"id": "a"}', '["a"]', '[{"id": "a"}]',
                                  '[{"id": "a", "kind": "hub", "path": "/p", "size": "big", "complete": true}]'])
def test_a_listing_that_is_not_one_says_so_in_one_sentence(text):
    with pytest.raises(model_list.ModelCommandError) as failure:
        model_list.parse_model_list(text)
    assert "\n" not in str(failure.value) and "model list" in str(failure.value)


def test_sizes_and_download_progress_read_like_the_hub_shows_them():
    assert [model_list.format_size(size) for size in (0, 999, 1000, 350_000_000, 5_210_000_000, 123_000_000_000)] == \
        ["0 B", "999 B", "1.0 kB", "350 MB", "5.2 GB", "123 GB"]
    assert model_list.format_progress(1_200_000_000, 5_100_000_000) == "1.2 / 5.1 GB"
    assert model_list.format_progress(350_000, 2_000_000) == "0.3 / 2.0 MB"  # the total's unit for both
    assert model_list.format_progress(512, 900) == "512 / 900 B"
    assert model_list.format_progress(0, 0) == ""  # total not known yet


def test_the_backends_error_line_is_the_sentence():
    stderr = "some warning\nerror: The model folder /x does not exist.\n"
    assert model_list.backend_sentence(stderr, "it failed") == "The model folder /x does not exist."
    assert model_list.backend_sentence("Traceback ...\nImportError: no huggingface_hub\n", "It failed") == \
        "It failed: ImportError: no huggingface_hub"
    assert model_list.backend_sentence("", "It failed") == "It failed."


def test_each_family_says_what_it_needs_and_the_size_presets_follow_its_view_size():
    listing = json.loads(LISTING) + [
        {"id": "stabilityai/stable-diffusion-xl-base-1.0", "kind": "hub", "path": "/cache/xl", "size": 6_940_000_000,
         "family": "SDXL", "architecture": "SDXL", "complete": True, "window_px": 1024},
        {"id": "/models/xl.safetensors", "kind": "single_file", "path": "/models/xl.safetensors", "size": 6_900_000_000,
         "family": "SDXL", "architecture": "SDXL", "complete": True},  # no configs: the architecture's view size
        {"id": "stabilityai/stable-diffusion-2-1", "kind": "hub", "path": "/cache/v", "size": 5_200_000_000,
         "family": "SD2", "architecture": "SD2", "complete": True, "window_px": 768}]
    models = model_list.parse_model_list(json.dumps(listing))
    xl, single, v = models[-3:]
    assert xl.summary() == "6.9 GB, SDXL, 1024 px views, about 8 GB of GPU memory, complete"
    assert (single.family_text, single.native_window_px) == ("SDXL", 1024)
    assert (v.family_text, v.native_window_px) == ("SD 2.x", 768)
    # sdxl-turbo as listed says 512 px (a Turbo model trained at 512 px); its family still reads SDXL Turbo.
    assert model_list.native_window_px("stabilityai/sdxl-turbo", models) == 512
    assert model_list.native_window_px(xl.id, models) == 1024
    assert model_list.native_window_px("someone/not-listed", models) == model_list.DEFAULT_WINDOW_PX == 512

    # The presets of a 512-px model are the table's; SDXL's are twice as large (the same views), 768-px 1.5 times.
    assert generation.resolution("WORLD", "DRAFT") == (1024, 512)
    sizes = {window: [generation.resolution("WORLD", preset, window) for preset in ("DRAFT", "STANDARD", "HIGH")]
             for window in (512, 768, 1024)}
    assert sizes[512] == [(1024, 512), (2048, 1024), (4096, 2048)]
    assert sizes[1024] == [(2048, 1024), (4096, 2048), (8192, 4096)]
    assert sizes[768] == [(1536, 768), (3072, 1536), (6144, 3072)]
    # No preset is smaller than the model's view: a world is a view tall and two wide, a texture and a wide image
    # at least one view each way.
    for window in (512, 768, 1024):
        for mode in generation.RESOLUTIONS:
            for preset in ("DRAFT", "STANDARD", "HIGH"):
                width, height = generation.resolution(mode, preset, window)
                assert min(width, height) >= window and width % 64 == 0 and height % 64 == 0
                assert mode != "WORLD" or width >= 2 * window
    # Generate sends the size for the model.
    params = generation.generate_params(generation_settings(mode="WORLD", resolution="DRAFT"), 1, model=xl.id,
                                        device="cpu", window_px=xl.native_window_px)
    assert (params["width"], params["height"]) == (2048, 1024)


def test_the_model_menu_lists_the_default_the_installed_models_and_a_typed_one():
    models = model_list.parse_model_list(LISTING)
    choices = model_list.model_choices(models, "stabilityai/sdxl-turbo")
    assert [model_id for model_id, _, _ in choices] == [
        "stabilityai/stable-diffusion-2-base", "stabilityai/sdxl-turbo", "/models/my-lcm", "/models/old.safetensors"]
    labels = {model_id: label for model_id, label, _ in choices}
    assert labels["stabilityai/sdxl-turbo"] == "stabilityai/sdxl-turbo (partial)"
    assert labels["/models/my-lcm"] == "my-lcm"
    assert all(description for _, _, description in choices)

    # Nothing listed yet: the backend's default (not installed) and a typed hub id or path, each once.
    assert model_list.model_choices([], model_list.DEFAULT_MODEL) == [
        (model_list.DEFAULT_MODEL, f"{model_list.DEFAULT_MODEL} (not installed)",
         "Not in the model cache: Generate downloads it first (with online access)")]
    typed = model_list.model_choices([], "someone/model")
    assert [label for _, label, _ in typed] == [f"{model_list.DEFAULT_MODEL} (not installed)",
                                                "someone/model (not installed)"]
    path = os.path.abspath("my-checkpoint.safetensors")
    assert model_list.model_choices([], path)[1][:2] == (path, path)
    assert len(model_list.model_choices([], "  ")) == 1  # a blank Default Model is no item


# --- downloads against the local hub --------------------------------------------------------------------


def test_a_download_reports_byte_progress_in_order_then_done_and_is_listed(backend_env, served_model):
    job = download(backend_env)
    assert job.wait(timeout_s=120) and job.state == "done", job.error
    total = folder_size(served_model)
    progress = [event for event in job.seen if event["event"] == "progress"]
    assert progress and all(event["stage"] == "downloading" and event["total"] == total for event in progress)
    steps = [event["step"] for event in progress]
    assert steps == sorted(steps) and steps[-1] == total and progress[-1]["file"] is None
    started = [event["file"] for event in progress if event["file"]]
    assert UNET_WEIGHTS in started and VAE_WEIGHTS in started
    assert job.seen[-1]["event"] == "done"  # the last event handled: the download is over
    assert (job.bytes_done, job.bytes_total, job.fraction) == (total, total, 1.0)
    assert os.path.isfile(os.path.join(job.path, "model_index.json"))
    assert job.status_text() == f"Downloaded {MODEL_ID}"

    (model,) = listed(backend_env)
    assert (model.id, model.kind, model.family, model.size, model.complete) == (MODEL_ID, "hub", "SD2", total, True)
    assert model.path == job.path and model.removable


def test_cancel_stops_the_process_half_way_and_a_later_download_resumes(backend_env, served_model, hub, stall):
    stall.held.add(UNET_WEIGHTS)
    job = model_list.start_download(backend(*model_list.download_arguments(MODEL_ID)), backend_env, REPO, MODEL_ID)
    assert model_list.current_download() is job and model_list.is_downloading()
    deadline = time.monotonic() + 120
    while job.current_file != UNET_WEIGHTS:  # the backend says which file it fetches before it asks for it
        assert not job.poll(wait_s=0.2), job.error
        assert time.monotonic() < deadline
    assert job.status_text().startswith(f"Downloading {MODEL_ID}: ") and " / " in job.status_text()
    assert 0 < job.fraction < 1
    assert stall.reached.wait(60)  # the hub is sending the UNet's weights now
    with pytest.raises(model_list.ModelCommandError, match="still downloading"):  # one at a time
        model_list.start_download(backend(*model_list.download_arguments("other/model")), backend_env, REPO,
                                  "other/model")

    job.cancel()
    assert job.state == "cancelled" and job.process.returncode is not None  # the process is gone
    assert job.path is None and job.error is None  # no done (nor error) came
    assert job.poll(wait_s=0.1) and job.state == "cancelled"  # a late exit event does not turn it into an error
    assert not model_list.is_downloading() and "resumes" in job.status_text()
    (model,) = listed(backend_env)
    assert not model.complete and "unet weights" in model.missing

    # The configs and the text encoder stay in the cache: the next download fetches only the rest.
    hub.reset_counters()
    again = download(backend_env)
    assert again.wait(timeout_s=120) and again.state == "done", again.error
    assert hub.bytes_sent == folder_size(served_model, [UNET_WEIGHTS, VAE_WEIGHTS]) < folder_size(served_model)
    first = next(event for event in again.seen if event["event"] == "progress")
    assert first["step"] > 0  # counted from what was already there
    assert listed(backend_env)[0].complete


def test_download_errors_are_the_backends_one_sentence(backend_env, hub, tmp_path):
    unknown = download(backend_env, "syncsphere-test/no-such-model")
    hub.gated.add(MODEL_ID)
    gated = download(backend_env)
    local = download(backend_env, str(tmp_path))
    for job in (unknown, gated, local):
        assert job.wait(timeout_s=120) and job.state == "error" and job.path is None
        assert "\n" not in job.error and job.status_text() == job.error
    assert "syncsphere-test/no-such-model" in unknown.error and "not found" in unknown.error
    # An id typed as an option is refused as not a hub id, not read as --help (which would print help and exit 0).
    option_like = download(backend_env, "--help")
    assert option_like.wait(timeout_s=120) and option_like.state == "error" and "never start with '-'" in option_like.error
    for words in (MODEL_ID, "gated", "HF_TOKEN"):
        assert words in gated.error
    assert "local path" in local.error


def test_a_process_that_dies_or_cannot_start_fails_in_one_sentence(backend_env):
    dying = model_list.ModelDownload([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                                     backend_env, REPO, MODEL_ID)
    dying.start()
    assert dying.wait(timeout_s=60) and dying.state == "error"
    assert dying.error == f"The download of {MODEL_ID} stopped unexpectedly (exit code 3): boom"
    missing = model_list.ModelDownload([os.path.join(REPO, "no-such-python")], backend_env, REPO, MODEL_ID)
    missing.start()
    assert missing.finished and missing.state == "error" and "could not be started" in missing.error


# --- listing and removing -----------------------------------------------------------------------------


def test_refresh_lists_the_cache_and_the_model_folder_and_remove_deletes_only_cache_entries(
        backend_env, served_model, tmp_path):
    assert download(backend_env).wait(timeout_s=120)
    folders = [served_model]  # a diffusers folder the user pointed at
    models = model_list.refresh(backend(*model_list.list_arguments(folders)), backend_env, REPO)
    assert [(model.id, model.kind) for model in models] == [(MODEL_ID, "hub"), (served_model, "folder")]
    assert model_list.cached_models() == models and model_list.has_listed() and model_list.listing_error() is None

    # The backend refuses to delete a folder the user pointed at; it stays.
    with pytest.raises(model_list.ModelCommandError) as refusal:
        model_list.remove_installed(backend(*model_list.remove_arguments(served_model)), backend_env, REPO)
    assert "local path" in str(refusal.value) and "\n" not in str(refusal.value)
    assert os.path.isfile(os.path.join(served_model, "model_index.json"))

    message = model_list.remove_installed(backend(*model_list.remove_arguments(MODEL_ID)), backend_env, REPO)
    assert MODEL_ID in message and "freeing" in message
    assert [model.id for model in listed(backend_env, folders)] == [served_model]

    # A Model Folder that does not exist: the backend's sentence, and the last good list stays.
    with pytest.raises(model_list.ModelCommandError, match="does not exist"):
        model_list.refresh(backend(*model_list.list_arguments([str(tmp_path / "nowhere")])), backend_env, REPO)
    assert "does not exist" in model_list.listing_error() and model_list.cached_models() == models

    thread = model_list.refresh_in_background(backend(*model_list.list_arguments()), backend_env, REPO)
    thread.join(timeout=60)
    assert model_list.cached_models() == [] and model_list.listing_error() is None
