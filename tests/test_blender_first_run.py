"""The first run in headless Blender: the main panel's first-run steps (panels/first_run.py), drawn with the
recording layout of tests/test_blender_panels.py while an artist goes from nothing to a model that Generate
can use: no backend (Set Up Backend first), the backend set (the models listed), no model (its download offered
with its size), the download running (its progress, Cancel), the download pressed in the panel and finished
(the steps gone, Generate left). The operators run for real against the local hub of tests/test_addon_models.py,
as in tests/test_blender_models.py (Blender 5.0, and 4.2 through SYNCSPHERE_TEST_BLENDER_PYTHON)."""

import os
import sys
import threading

import pytest

import test_addon_models
from test_addon_models import MODEL_ID, UNET_WEIGHTS
from test_blender_models import BLENDER_PYTHON, run_blender
from test_extension import _bpy_dir

# The local hub's fixtures, used here by name.
hub, served_model, stall = test_addon_models.hub, test_addon_models.served_model, test_addon_models.stall

pytestmark = pytest.mark.skipif(BLENDER_PYTHON == os.path.abspath(sys.executable) and _bpy_dir() is None,
                                reason="bpy is not installed")

# Runs after the models helpers: what the main panel draws, in order.
_FIRST_RUN_HELPERS = r"""
import re

def main_panel():
    '''The main panel's calls, summarised: the first-run steps' titles (numbered labels), every label, the
    operators with their model ids, progress bars, and where the box, the prompt and Generate are drawn.'''
    calls = draw("SYNCSPHERE_PT_view3d")
    labels = [call["args"].get("text", "") for call in calls if call["method"] == "label"]
    operators = [[call["args"]["operator"], call["properties"].get("model_id", "")]
                 for call in calls if call["method"] == "operator"]
    def first(test):
        return next((number for number, call in enumerate(calls) if test(call)), None)
    return {"titles": [label for label in labels if re.match(r"\d\. ", label)], "labels": labels,
            "operators": operators, "progress": [call["args"].get("text", "") for call in calls if call["method"] == "progress"],
            "box": first(lambda call: call["method"] == "box"),
            "prompt": first(lambda call: call["args"].get("property") == "prompt"),
            "generate": first(lambda call: call["args"].get("operator") == "syncsphere.generate")}
"""


def test_the_first_run_steps_lead_from_no_backend_to_an_installed_model(hub, served_model, stall, tmp_path):
    stall.held.add(UNET_WEIGHTS)
    reached = tmp_path / "stall-reached"  # the hub is sending the UNet's weights: the download is half-way
    threading.Thread(target=lambda: stall.reached.wait(120) and reached.touch(), daemon=True).start()

    report, _ = run_blender(_FIRST_RUN_HELPERS + f"""
MODEL_ID, REACHED = {MODEL_ID!r}, {str(reached)!r}
report = {{}}
backend_python = prefs.python_path
prefs.python_path = ""
report["no backend"] = main_panel()
watch = models_operators.list_when_a_backend_is_set  # the add-on's timer (timers never fire here: called by hand)
report["watch without backend"] = [watch(), model_list.has_listed()]
prefs.python_path = backend_python  # as Set Up Backend does when it has made the environment
report["listing"] = main_panel()  # nothing until the listing it starts has ended
ticks, deadline = [], time.monotonic() + 120
while not ticks or ticks[-1] is not None:
    ticks.append(watch())
    assert time.monotonic() < deadline
    time.sleep(0.2)
report["watch with backend"] = [ticks[0], ticks[-1], model_list.has_listed(), listed()]
report["no model"] = main_panel()

prefs.default_model = MODEL_ID
setup_operators.online_access = lambda: True  # read-only in Blender: patched where the operators ask
command = models_operators.backend_command.backend_command(BACKEND_PYTHON, *model_list.download_arguments(MODEL_ID))
model_list.start_download(command, models_operators.backend_command.backend_environment(),
                          models_operators.backend_command.EXTENSION_DIR, MODEL_ID)
deadline = time.monotonic() + 120
while not os.path.exists(REACHED):  # the UI's timer, called by hand
    assert models_operators.follow_download() == models_operators._TIMER_S
    assert time.monotonic() < deadline
    time.sleep(0.1)
models_operators.follow_download()
report["downloading"] = main_panel()
report["cancel"] = run(bpy.ops.syncsphere.cancel_model_download)
models_operators.follow_download()
report["cancelled"] = main_panel()
# The panel's Download button, pressed: in background mode it waits for the download, then lists the models.
report["download"] = run(bpy.ops.syncsphere.download_model, model_id=MODEL_ID)
report["ready"] = main_panel()
result(report)
""", tmp_path, hub)

    # No backend: its step first, then the model (what it will cost), then Generate; above the prompt.
    first = report["no backend"]
    assert first["titles"] == ["1. Set up the backend", "2. Download a model", "3. Generate"]
    assert first["operators"][:2] == [["syncsphere.setup_backend", ""], ["preferences.addon_show", ""]]
    assert first["operators"][-1] == ["syncsphere.generate", ""]
    assert first["box"] < first["prompt"] < first["generate"]
    assert any("about 5.2 GB" in label for label in first["labels"])
    # Set: the add-on's timer lists the models as soon as there is a backend (nothing to show meanwhile), and
    # stops once they are listed (an empty cache).
    assert report["watch without backend"] == [2.0, False]
    assert report["listing"]["titles"] == [] and report["listing"]["box"] is None
    assert report["watch with backend"] == [2.0, None, True, []]
    # Listed, and the default model is not installed: its download, with its size, right there.
    no_model = report["no model"]
    assert no_model["titles"] == ["1. Download a model", "2. Generate"]
    assert ["syncsphere.download_model", "stabilityai/stable-diffusion-2-base"] in no_model["operators"]
    text = " ".join(no_model["labels"])
    assert "Download stabilityai/stable-diffusion-2-base (about 5.2 GB), the model Generate uses." in text
    assert "Allow Online Access" in text  # headless Blender's online access is off
    # Half-way: the bytes so far and Cancel, in the panel.
    downloading = report["downloading"]
    (progress,) = downloading["progress"]
    assert progress.startswith(f"Downloading {MODEL_ID}: ") and progress.endswith(" kB")
    assert ["syncsphere.cancel_model_download", ""] in downloading["operators"]
    assert downloading["box"] < downloading["prompt"]
    # Cancelled: offered again; pressed: downloaded, listed, and the steps are gone.
    assert report["cancel"] == [["FINISHED"], None]
    assert ["syncsphere.download_model", MODEL_ID] in report["cancelled"]["operators"]
    assert report["download"] == [["FINISHED"], None]
    ready = report["ready"]
    assert ready["titles"] == [] and ready["box"] is None and ready["operators"] == [["syncsphere.generate", ""]]
