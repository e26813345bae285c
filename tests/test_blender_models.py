"""The Models list, the panel's model menu and the Memory setting in headless Blender.

Like tests/test_blender_panels.py, the add-on is registered and enabled in a fresh bpy interpreter and what
the preferences and panels draw is recorded with its ``RecordingLayout``. The operators run for real: they
start ``python -m backend models ...`` with this interpreter (which has the backend's requirements), against
the local hub of tests/test_addon_models.py (``HF_ENDPOINT``) and a tmp ``HF_HOME``. No network.

The Python that runs Blender (the bpy module) is this one by default; CI points
``SYNCSPHERE_TEST_BLENDER_PYTHON`` at the Blender 4.2 environment too.
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from test_addon_models import MODEL_ID, REPO, UNET_WEIGHTS, folder_size
from test_addon_models import hub, served_model, stall  # noqa: F401 (fixtures)
from test_blender_panels import _HELPERS
from test_extension import _PRELUDE, _bpy_dir

BLENDER_PYTHON = os.path.abspath(os.environ.get("SYNCSPHERE_TEST_BLENDER_PYTHON", sys.executable))

pytestmark = pytest.mark.skipif(BLENDER_PYTHON == os.path.abspath(sys.executable) and _bpy_dir() is None,
                                reason="bpy is not installed")

# Runs after the panels' helpers (the add-on enabled, RecordingLayout, draw(), result(), finish()).
_MODELS_HELPERS = r"""
import time
from syncsphere.blender_addon.core import generation, model_list
from syncsphere.blender_addon.scene import preferences

models_operators = sys.modules["syncsphere.operators.models"]
setup_operators = sys.modules["syncsphere.operators.setup"]
prefs.python_path = BACKEND_PYTHON  # the backend needs torch and huggingface_hub, which bpy's Python may lack


def run(operator, **properties):
    '''Run an operator: (sorted result set, None), or (None, the error sentence it reported).'''
    try:
        return sorted(operator(**properties)), None
    except RuntimeError as error:  # an ERROR report raises in background mode
        return None, str(error).strip()


def models_box():
    '''What the preferences' Models box draws: labels, operators with their model ids, progress bars.'''
    calls = []
    preferences.draw_models(RecordingLayout(calls), prefs)
    return {"labels": [call["args"]["text"] for call in calls if call["method"] == "label"],
            "operators": [[call["args"]["operator"], call["properties"].get("model_id", "")]
                          for call in calls if call["method"] == "operator"],
            "progress": [call["args"].get("text", "") for call in calls if call["method"] == "progress"],
            "props": [call["args"]["property"] for call in calls if call["method"] == "prop"]}


def listed():
    '''The cached listing as [id, kind, family, size, complete].'''
    return [[model.id, model.kind, model.family, model.size, model.complete] for model in model_list.cached_models()]
"""


def run_blender(code, tmp_path, hub=None):
    """Run ``code`` after the helpers in a fresh headless Blender whose backend processes reach the local
    hub and keep their cache in tmp; returns (what it passed to result(), its stdout)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    script = (_PRELUDE + _HELPERS + f"TMP = {str(tmp_path)!r}\nBACKEND_PYTHON = {sys.executable!r}\n"
              + _MODELS_HELPERS + code + "\nfinish()\n")
    done = subprocess.run([BLENDER_PYTHON, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(lines[-1][len("RESULT "):]), done.stdout


def test_download_cancel_resume_list_set_default_menu_and_remove(hub, served_model, stall, tmp_path):
    """The whole Models list on a tmp cache: a download cancelled half-way in the UI (timer) path, resumed by
    the operator in background mode with its progress printed, listed with family and size, set as default,
    chosen in the panel's menu and sent by generate_params, removed; a Model Folder listed and never removed."""
    total = folder_size(served_model)
    stall.held.add(UNET_WEIGHTS)
    reached = tmp_path / "stall-reached"  # tells the Blender script the hub is sending the UNet's weights now
    threading.Thread(target=lambda: stall.reached.wait(120) and reached.touch(), daemon=True).start()

    report, stdout = run_blender(f"""
from types import SimpleNamespace
MODEL_ID, REACHED, FOLDER = {MODEL_ID!r}, {str(reached)!r}, {served_model!r}
report = {{"before": models_box()}}
prefs.download_id = MODEL_ID
report["offline"] = run(bpy.ops.syncsphere.download_model)  # bpy's online access is off
setup_operators.online_access = lambda: True  # read-only in Blender: patched where the operators ask

# The UI path without a UI: the download started as the operator starts it, followed by calling its timer
# function (Blender's timers never fire here), Cancel pressed half-way.
command = models_operators.backend_command.backend_command(BACKEND_PYTHON, *model_list.download_arguments(MODEL_ID))
model_list.start_download(command, models_operators.backend_command.backend_environment(),
                          models_operators.backend_command.EXTENSION_DIR, MODEL_ID)
deadline = time.monotonic() + 120
while not os.path.exists(REACHED):
    assert models_operators.follow_download() == models_operators._TIMER_S
    assert time.monotonic() < deadline
    time.sleep(0.1)
models_operators.follow_download()
report["while downloading"] = models_box()
report["poll while downloading"] = [bpy.ops.syncsphere.download_model.poll(),
                                    bpy.ops.syncsphere.cancel_model_download.poll()]
report["cancel"] = run(bpy.ops.syncsphere.cancel_model_download)
report["after cancel"] = [models_operators.follow_download(), models_box()["labels"][-1]]
report["refresh"] = run(bpy.ops.syncsphere.refresh_models)
report["partial"] = [listed(), models_box()]

# Background mode: the operator waits for the download (which resumes), printing its progress, then lists.
report["download"] = run(bpy.ops.syncsphere.download_model)
report["downloaded"] = [listed(), models_box()["labels"][-1]]
prefs.model_folder = FOLDER  # a diffusers folder of the user's own
report["with folder"] = [run(bpy.ops.syncsphere.refresh_models), listed(), models_box()]

report["set default"] = run(bpy.ops.syncsphere.set_default_model, model_id=MODEL_ID)
report["default"] = [prefs.default_model, prefs.default_model_menu]
report["menu"] = [list(item) for item in preferences.default_model_menu_items(prefs)]
report["main panel"] = [[call["args"]["property"], call["args"].get("text")] for call in draw("SYNCSPHERE_PT_view3d")
                        if call["method"] == "prop" and call["args"]["data"] == "prefs"]
report["backend panel"] = [[call["args"]["property"], call["args"].get("text")] for call in draw("SYNCSPHERE_PT_view3d_backend")
                        if call["method"] == "prop" and call["args"]["data"] == "prefs"]
report["sent"] = [generation.generate_params(settings, 7, model=prefs.default_model, device="cpu")["model"]]
prefs.default_model_menu = FOLDER  # picking the folder in the panel's menu sets Default Model
report["sent"].append(generation.generate_params(settings, 7, model=prefs.default_model, device="cpu")["model"])
try:
    prefs.default_model_menu = "someone/not-listed"
except TypeError:
    report["not an item"] = True
prefs.default_model = "someone/typed-model"  # a typed id is an item of the menu too
report["typed"] = [prefs.default_model_menu, [item[0] for item in preferences.default_model_menu_items(prefs)]]

report["remove folder"] = run(bpy.ops.syncsphere.remove_model, model_id=FOLDER)
report["folder kept"] = os.path.isfile(os.path.join(FOLDER, "model_index.json"))
cache_entry = os.path.join(os.environ["HF_HOME"], "hub", "models--" + MODEL_ID.replace("/", "--"))
report["cache entry before"] = os.path.isdir(cache_entry)
report["remove"] = run(bpy.ops.syncsphere.remove_model, model_id=MODEL_ID)
report["removed"] = [os.path.isdir(cache_entry), listed()]
prefs.download_id = "syncsphere-test/no-such-model"
report["unknown"] = [run(bpy.ops.syncsphere.download_model), models_box()["labels"]]
result(report)
""", tmp_path, hub)

    # Before the first listing the box says how to get one, and shows the Download field and the Model Folder.
    assert "Press Refresh to list the installed models" in report["before"]["labels"]
    assert report["before"]["props"] == ["model_folder", "download_id", "download_fp16"]
    assert report["before"]["operators"] == [["syncsphere.refresh_models", ""], ["syncsphere.download_model", ""]]
    assert report["offline"][0] is None and "Allow Online Access" in report["offline"][1]

    # Half-way: a byte progress bar and Cancel; no second download meanwhile.
    (progress,) = report["while downloading"]["progress"]
    assert progress.startswith(f"Downloading {MODEL_ID}: ") and progress.endswith(" kB")
    assert ["syncsphere.cancel_model_download", ""] in report["while downloading"]["operators"]
    assert report["poll while downloading"] == [False, True]
    assert report["cancel"] == [["FINISHED"], None]
    assert report["after cancel"] == [None, f"Download of {MODEL_ID} cancelled; downloading it again resumes it"]
    # What came stays: the model is listed as partial, with Resume.
    assert report["refresh"] == [["FINISHED"], None]
    (partial,), box = report["partial"]
    assert partial[:3] == [MODEL_ID, "hub", "SD2"] and partial[4] is False
    assert ["syncsphere.download_model", MODEL_ID] in box["operators"]
    assert any("partial: missing unet weights" in label for label in box["labels"])

    # The background download resumed and printed its bytes; the list was refreshed with the model complete.
    assert report["download"] == [["FINISHED"], None]
    printed = [line for line in stdout.splitlines() if line.startswith(f"Downloading {MODEL_ID}: ")]
    assert printed and printed[-1].endswith(" kB") and not printed[0].startswith(f"Downloading {MODEL_ID}: 0.0 ")
    assert report["downloaded"] == [[[MODEL_ID, "hub", "SD2", total, True]], f"Downloaded {MODEL_ID}"]

    # With the Model Folder: both listed; Remove only for the cache entry, Set as Default for both.
    refresh, models, box = report["with folder"]
    assert refresh == [["FINISHED"], None]
    assert [model[:2] for model in models] == [[MODEL_ID, "hub"], [served_model, "folder"]]
    assert box["operators"] == [["syncsphere.refresh_models", ""],
                                ["syncsphere.set_default_model", MODEL_ID], ["syncsphere.remove_model", MODEL_ID],
                                ["syncsphere.set_default_model", served_model], ["syncsphere.download_model", ""]]
    size = f"{total / 1000:.0f} kB"
    # The tiny model's UNet is trained at 32 latents: 256 px views.
    assert MODEL_ID in box["labels"]
    assert f"{size}, SD 2.x, 256 px views, about 4 GB of GPU memory, complete" in box["labels"]
    assert os.path.basename(served_model) in box["labels"]

    # Set as Default, the panel's menu, and what Generate sends.
    assert report["set default"] == [["FINISHED"], None]
    assert report["default"] == [MODEL_ID, MODEL_ID]
    assert [item[0] for item in report["menu"]] == ["stabilityai/stable-diffusion-2-base", MODEL_ID, served_model]
    assert report["menu"][0][1] == "stabilityai/stable-diffusion-2-base (not installed)"
    assert [item[3] for item in report["menu"]] == [0, 1, 2]
    # The model menu is in the Backend sub-panel (the main panel is Prompt ... Generate), above the typed id or path.
    assert report["main panel"] == []
    assert report["backend panel"] == [["default_model_menu", "Model"], ["default_model", "Model ID or Path"],
                                       ["python_path", "Python"]]
    assert report["sent"] == [MODEL_ID, served_model]
    assert report["not an item"]
    assert report["typed"] == ["someone/typed-model", ["stabilityai/stable-diffusion-2-base", MODEL_ID, served_model,
                                                       "someone/typed-model"]]

    # Remove: a folder of the user's is refused and kept; the cache entry goes.
    assert report["remove folder"][0] is None and "local path" in report["remove folder"][1]
    assert report["folder kept"]
    assert report["cache entry before"] and report["remove"] == [["FINISHED"], None]
    assert report["removed"] == [False, [[served_model, "folder", "SD2", folder_size(served_model), True]]]

    # A download that fails: the backend's sentence, reported and shown in the box.
    result, error = report["unknown"][0]
    assert result is None and "syncsphere-test/no-such-model" in error and "not found" in error
    assert error.removeprefix("Error: ") in " ".join(report["unknown"][1])  # wrapped into lines


def test_the_preferences_draw_the_models_box_and_memory_is_a_scene_setting(tmp_path):
    """The whole preferences draw (the Models box at the end), and Memory: the backend's three modes, sent
    with every generation, drawn in the Advanced sub-panel."""
    report, _ = run_blender("""
calls = []
preferences.draw_preferences(RecordingLayout(calls), prefs)  # what the preferences' draw() draws
drawn = [call["args"].get("property") or call["args"].get("operator") for call in calls
         if call["method"] in ("prop", "operator")]
properties = settings.bl_rna.properties
report = {"drawn": drawn,
          "items": [[item.identifier, item.name, item.description] for item in properties["memory"].enum_items],
          "default": properties["memory"].default,
          "sent": generation.generate_params(settings, 7, model="m", device="cpu")["memory"]}
settings.memory = "low"
report["low"] = generation.generate_params(settings, 7, model="m", device="cpu")["memory"]
report["advanced"] = [call["args"]["property"] for call in draw("SYNCSPHERE_PT_world_advanced")
                      if call["method"] == "prop"]
prefs.backend_kind = "SERVER"
calls = []
preferences.draw_preferences(RecordingLayout(calls), prefs)
report["server_drawn"] = [call["args"].get("property") for call in calls if call["method"] == "prop"][:6]
report["backends"] = [item.identifier for item in prefs.bl_rna.properties["backend_kind"].enum_items]
report["token_subtype"] = prefs.bl_rna.properties["server_token"].subtype
prefs.server_url, prefs.server_token = "https://gpu.studio:8443", "secret-token-1234567890"
report["server"] = repr(preferences.remote_backend(prefs))
report["check offline"] = run(bpy.ops.syncsphere.check_backend)  # bpy's online access is off
settings.prompt = "a harbour"
report["generate offline"] = run(bpy.ops.syncsphere.generate)
prefs.backend_kind = "LOCAL"
result(report)
""", tmp_path)
    from backend.request import MEMORY_MODES

    assert [item[0] for item in report["items"]] == list(MEMORY_MODES) == ["auto", "full", "low"]
    assert [item[1] for item in report["items"]] == ["Auto", "Full", "Low"]
    descriptions = {item[0]: item[2] for item in report["items"]}
    assert "free memory" in descriptions["auto"]
    assert "Slower" in descriptions["low"] and "smaller GPUs" in descriptions["low"]
    assert (report["default"], report["sent"], report["low"]) == ("auto", "auto", "low")
    assert report["advanced"] == ["steps", "guidance", "view_set", "prompt_up", "prompt_down", "sync_method", "mad",
                                  "window", "stride", "device", "memory", "quantize"]
    assert report["drawn"] == ["backend_kind", "python_path", "default_model", "device", "output_dir", "keep_warm", "timeout_s",
                               "syncsphere.setup_backend", "syncsphere.check_backend", "syncsphere.refresh_models",
                               "model_folder", "download_id", "download_fp16", "syncsphere.download_model"]
    # Backend = Server draws its URL and token (a password field, never shown: not even in the backend's repr).
    assert report["backends"] == ["LOCAL", "SSH", "SERVER"]
    assert report["server_drawn"] == ["backend_kind", "server_url", "server_token", "server_token_file", "default_model",
                                      "device"]
    assert report["token_subtype"] == "PASSWORD"
    assert "https://gpu.studio:8443" in report["server"] and "secret-token" not in report["server"]
    # Like SSH, a server is reached only with Blender's online access on: one sentence, nothing started.
    offline = [None, "Error: Backend = Server connects to another machine: turn on Allow Online Access in Blender's "
                            "Preferences > System > Network, or set Backend to Local"]
    assert report["check offline"] == offline and report["generate offline"] == offline


def test_an_sdxl_model_in_the_list_shows_its_family_and_the_size_menu_follows_its_views(tmp_path):
    """A (tiny, random) SDXL folder with SDXL's trained size in the Model Folder: the Models box names its family
    and its 1024-px views; choosing it doubles the Size presets the main panel shows (issue 20, item 4)."""
    from model_factory import TINY_SDXL_UNET, save_random_sdxl_model

    folder = tmp_path / "models"
    save_random_sdxl_model(str(folder / "tiny-xl"), unet_config={**TINY_SDXL_UNET, "sample_size": 128})
    report, _ = run_blender(f"""
prefs.model_folder = {str(folder)!r}
report = {{"refresh": run(bpy.ops.syncsphere.refresh_models)}}
xl = next(model for model in model_list.cached_models() if model.label == "tiny-xl")


def sizes():
    '''The Size control's label in the main panel for each preset of a 360 World.'''
    labels = []
    for preset in ("DRAFT", "STANDARD", "HIGH"):
        settings.resolution = preset
        labels += [call["args"]["text"] for call in draw("SYNCSPHERE_PT_world")
                   if call["method"] == "prop" and call["args"].get("property") == "resolution"]
    return labels


settings.mode = "WORLD"
report["before"] = [prefs.default_model, sizes()]
report["set default"] = run(bpy.ops.syncsphere.set_default_model, model_id=xl.id)
report["after"] = [prefs.default_model == xl.id, sizes()]
report["box"] = models_box()["labels"]
report["menu"] = [item[2] for item in preferences.default_model_menu_items(prefs) if item[0] == xl.id]
result(report)
""", tmp_path)
    assert report["refresh"] == [["FINISHED"], None]
    assert report["before"] == ["stabilityai/stable-diffusion-2-base",
                                ["Size (1024x512)", "Size (2048x1024)", "Size (4096x2048)"]]
    assert report["set default"] == [["FINISHED"], None]
    assert report["after"] == [True, ["Size (2048x1024)", "Size (4096x2048)", "Size (8192x4096)"]]
    summary = next(label for label in report["box"] if "SDXL" in label)
    assert ", SDXL, 1024 px views, about 8 GB of GPU memory, complete" in summary
    assert len(report["menu"]) == 1 and ", SDXL, 1024 px views" in report["menu"][0]
