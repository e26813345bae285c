"""The first-run steps (blender_addon/core/first_run.py) without Blender: the backend first, then the model with
its size and the download's progress, then Generate; nothing once both are in place."""

import sys

import pytest

from syncsphere.blender_addon.core import first_run, model_list
from syncsphere.blender_addon.core.model_list import DEFAULT_MODEL, InstalledModel

ADDON = "bl_ext.user_default.syncsphere"
USABLE_PYTHON = sys.executable  # an executable file: what interpreter_error accepts


def steps(python=USABLE_PYTHON, online=True, listed=True, listing_error=None, models=(), model=DEFAULT_MODEL,
          download=None, fp16=False):
    """first_run_steps for a state; by default a usable backend and an empty listing."""
    return first_run.first_run_steps(python=python, online=online, listed=listed, listing_error=listing_error,
                                     models=list(models), model=model, download=download, fp16=fp16,
                                     addon_module=ADDON)


def installed(model_id, complete=True):
    return InstalledModel(model_id, "hub", f"/cache/{model_id}", 5_200_000_000, "SD2", complete,
                          [] if complete else ["unet weights"])


def download_of(model_id, state="running", done=0, total=0, error=None):
    """A ModelDownload in ``state``, as its events would leave it (no process behind it)."""
    download = model_list.ModelDownload(["python"], {}, "/", model_id)
    download.state, download.bytes_done, download.bytes_total, download.error = state, done, total, error
    return download


def operators(step):
    return [(action.operator, dict(action.properties)) for action in step.actions]


def test_with_no_backend_the_first_step_is_set_up_backend_then_the_model_then_generate():
    backend, model, generate = steps(python="", listed=False)
    assert backend.title == "1. Set up the backend" and backend.enabled
    assert "Set Up Backend installs one" in backend.text and "preferences" in backend.text
    assert operators(backend) == [("syncsphere.setup_backend", {}), ("preferences.addon_show", {"module": ADDON})]
    # The model comes next, greyed until the backend is there, with what it will cost.
    assert model.title == "2. Download a model" and not model.enabled and not model.actions
    assert f"{DEFAULT_MODEL} (about 5.2 GB)" in model.text
    assert generate.title == "3. Generate" and "press Generate" in generate.text


def test_a_backend_path_that_is_gone_says_so_and_offline_says_where_to_allow_downloads(tmp_path):
    missing = str(tmp_path / "no-python")
    backend = steps(python=missing, online=False, listed=False)[0]
    assert backend.text.startswith(f"The backend Python interpreter {missing!r} does not exist. Set Up Backend")
    assert "Allow Online Access" in backend.text


def test_with_the_backend_set_nothing_shows_while_the_models_are_being_listed():
    assert steps(listed=False) == []


def test_a_failed_listing_is_shown_with_try_again():
    find, generate = steps(listed=False, listing_error="The backend could not be started (boom).")
    assert find.title == "1. Find the installed models" and "boom" in find.text
    assert operators(find) == [("syncsphere.refresh_models", {})] and generate.title == "2. Generate"


@pytest.mark.parametrize("fp16, size", [(False, "about 5.2 GB"), (True, "about 2.6 GB")])
def test_with_no_model_installed_the_download_is_offered_with_its_size(fp16, size):
    model, generate = steps(fp16=fp16)
    assert model.title == "1. Download a model" and model.enabled
    assert model.text == f"Download {DEFAULT_MODEL} ({size}), the model Generate uses."
    assert operators(model) == [("syncsphere.download_model", {"model_id": DEFAULT_MODEL})]
    assert generate.title == "2. Generate"


def test_a_model_whose_size_is_not_known_is_offered_without_one_and_offline_says_where_to_allow_it():
    model = steps(model="someone/other-model", online=False)[0]
    assert model.text.startswith("Download someone/other-model, the model Generate uses.")
    assert "Allow Online Access" in model.text


def test_nothing_to_do_once_the_model_is_installed_or_a_local_one_is_chosen():
    assert steps(models=[installed(DEFAULT_MODEL)]) == []
    assert steps(model="/models/my-model") == []
    assert steps(model="/models/my-model", python="")[0].title == "1. Set up the backend"


def test_a_partial_model_is_resumed_and_another_installed_one_is_suggested():
    model, _ = steps(models=[installed(DEFAULT_MODEL, complete=False), installed("someone/turbo")])
    assert "partly downloaded (partial: missing unet weights): Resume fetches the rest" in model.text
    assert "Or pick an installed model in the Model menu below." in model.text
    assert [action.text for action in model.actions] == ["Resume"]


def test_while_the_model_downloads_the_step_shows_its_progress_and_cancel():
    model, _ = steps(download=download_of(DEFAULT_MODEL, done=1_300_000_000, total=5_200_000_000))
    assert model.progress == pytest.approx(0.25)
    assert model.progress_text == f"Downloading {DEFAULT_MODEL}: 1.3 / 5.2 GB"
    assert operators(model) == [("syncsphere.cancel_model_download", {})]


def test_while_another_model_downloads_the_step_waits_for_it():
    model, _ = steps(download=download_of("someone/turbo", done=5, total=10))
    assert "someone/turbo is downloading" in model.text and not model.actions
    assert model.progress == 0.5


def test_a_failed_download_is_offered_again_with_its_sentence():
    failed = download_of(DEFAULT_MODEL, state="error", error="The hub cannot be reached.")
    model, _ = steps(download=failed)
    assert model.problem == "The hub cannot be reached." and [action.text for action in model.actions] == ["Download"]
    assert steps(download=download_of("someone/turbo", state="error", error="x"))[0].problem == ""
