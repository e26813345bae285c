"""The artist's path end to end in headless Blender (issue 21), with the built extension installed with
Blender's own tool and the real backend (a tiny local model):

- refusals before the job starts: a tileable texture without a mesh, an output folder that cannot be written, a
  model that is not there, a model not installed while offline, a setting the backend would refuse, no backend
  Python. Each is one sentence in the panel's words, and no job was started and no backend process spawned;
- the backend's sentences in the panel's words: a Sky Prompt with the Band view set;
- names after the prompt: the World, its images and the history item; a material only when it is new; the
  user's own data keeps its name;
- variations: three seeds in one press, three history items with their own images; Cancel stops a batch (the
  running job cancelled, the rest never started).

Like tests/test_blender_generate.py, each test runs one fresh Blender (5.0 here; SYNCSPHERE_TEST_BLENDER_PYTHON
points it at 4.2 too) and asserts on the JSON report it prints.
"""

import os
import textwrap

import pytest

import test_blender_generate
from test_blender_generate import run_blender

pytest.importorskip("diffusers")

# The built extension, installed as a user would (a module-scoped fixture of tests/test_blender_generate.py).
extension_zip = test_blender_generate.extension_zip

# Handles on the installed add-on's modules, and a 256x128 Draft world (4 windows of 16 latents) so a job takes
# seconds on a CPU.
SETUP = """
import importlib
session = importlib.import_module(ADDON + ".blender_addon.core.session")
generation = importlib.import_module(ADDON + ".blender_addon.core.generation")
preferences = importlib.import_module(ADDON + ".blender_addon.scene.preferences")
generation.RESOLUTIONS["WORLD"]["DRAFT"] = (256, 128)
generation.RESOLUTIONS["TILE"]["DRAFT"] = (128, 128)
LOG = os.path.join(preferences.user_folder("logs"), "backend.log")
"""


def with_setup(body):
    """The script ``body`` (indented as in the tests) after SETUP."""
    return SETUP + textwrap.dedent(body)


def test_every_refusal_comes_before_the_job_in_the_panels_words(extension_zip, tiny_model, tmp_path):
    report = run_blender(with_setup("""
        model_list = importlib.import_module(ADDON + ".blender_addon.core.model_list")
        worlds_before = sorted(bpy.data.worlds.keys())
        refusals = {}

        def refused(name):
            result, message = generate()
            # Nothing started: no batch, no worker object, no backend process (it would have opened its log).
            refusals[name] = {"result": result, "message": message, "batch": session.current_batch() is not None,
                              "worker": session._worker is not None, "log": os.path.exists(LOG)}

        # A tileable texture with no mesh to go on.
        settings.mode = "TILE"
        bpy.context.view_layer.objects.active = None
        refused("no mesh")
        bpy.ops.mesh.primitive_plane_add()  # a mesh for the rest
        # An output folder under a file.
        blocker = os.path.join(os.getcwd(), "a file")
        open(blocker, "w").close()
        prefs.output_dir = os.path.join(blocker, "outputs")
        refused("output folder")
        prefs.output_dir = os.path.join(os.getcwd(), "outputs")
        # A model path that is not there.
        prefs.default_model = os.path.join(os.getcwd(), "no-such-model")
        refused("model path")
        # A hub model that is not installed, with online access off (bpy's default) and the cache listed.
        os.environ["HF_HOME"] = os.path.join(os.getcwd(), "hf-home")
        assert bpy.ops.syncsphere.refresh_models() == {"FINISHED"} and model_list.has_listed()
        prefs.default_model = "someone/not-installed"
        refused("not installed")
        prefs.default_model = TINY_MODEL
        # A setting the backend refuses (its own validation, run before anything is sent).
        settings.mode, settings.exposure = "WORLD", 25.0
        refused("exposure")
        settings.exposure = 0.0
        # No backend Python.
        prefs.python_path = ""
        refused("no backend")
        print(json.dumps({"refusals": refusals, "online": bpy.app.online_access, "history": len(settings.history),
                          "same worlds": sorted(bpy.data.worlds.keys()) == worlds_before,
                          "outputs": sorted(os.listdir(prefs.output_dir)) if os.path.isdir(prefs.output_dir) else []}))
    """).replace("TINY_MODEL", repr(tiny_model)), extension_zip, tiny_model, tmp_path)
    refusals = report["refusals"]
    expected = {
        "no mesh": "Select a mesh object first: the tileable texture goes on the active object's material",
        "output folder": "cannot be written",
        "model path": "no-such-model does not exist; pick another in Backend › Model",
        "not installed": "The model someone/not-installed is not installed and Blender's online access is off",
        "exposure": "Lighting › Exposure must be a number of EV between -20 and 20, not 25.0.",
        "no backend": "No backend Python interpreter is set",
    }
    assert report["online"] is False
    for name, sentence in expected.items():
        refusal = refusals[name]
        assert refusal["result"] is None and sentence in refusal["message"], (name, refusal)
        assert not (refusal["batch"] or refusal["worker"] or refusal["log"]), (name, refusal)
        assert "--" not in refusal["message"], refusal["message"]
    assert "SyncSphere Preferences › Output Folder" in refusals["output folder"]["message"]
    assert report["history"] == 0 and report["same worlds"] and report["outputs"] == []


def test_names_after_the_prompt_and_the_backends_words_as_the_panels(extension_zip, tiny_model, tmp_path):
    report = run_blender(with_setup("""
        settings.prompt = "an alpine valley with a lake, 360 panorama"
        settings.randomize_seed, settings.seed = False, 3
        # The user's own data with the names SyncSphere would pick: kept, named as they are.
        user_world = bpy.data.worlds.new("Alpine Valley Lake")
        user_image = bpy.data.images.new("alpine-valley-lake.exr", 4, 4)
        bpy.context.scene.world = user_world
        settings.mode = "WORLD"
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        world = bpy.context.scene.world
        images = sorted(node.image.name for node in world.node_tree.nodes if node.type == "TEX_ENVIRONMENT")
        item = settings.history[0]
        named = {"world": world.name, "images": images, "title": item.title, "folder": os.path.basename(os.path.dirname(item.exr_path)),
                 "user world": user_world.name, "user image": user_image.name}
        # A texture on the default cube's own material (kept as it is), then on a new plane without one.
        settings.mode = "TILE"
        cube = bpy.data.objects["Cube"]
        bpy.context.view_layer.objects.active = cube
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        named["cube material"] = cube.active_material.name
        bpy.ops.mesh.primitive_plane_add()
        plane = bpy.context.active_object
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        texture = next(node for node in plane.active_material.node_tree.nodes if node.type == "TEX_IMAGE")
        named["plane material"], named["plane image"] = plane.active_material.name, texture.image.name
        named["titles"] = [entry.title for entry in settings.history]
        # The Band view set never looks up: the backend refuses a Sky Prompt, in the panel's words.
        settings.mode, settings.view_set, settings.prompt_up = "WORLD", "BAND", "clear blue sky"
        _, message = generate()
        print(json.dumps({"named": named, "message": message, "job error": session.current_job().error}))
    """), extension_zip, tiny_model, tmp_path)
    named = report["named"]
    assert (named["user world"], named["user image"]) == ("Alpine Valley Lake", "alpine-valley-lake.exr")
    assert named["world"] == named["title"] == "Alpine Valley Lake 2"
    assert "alpine-valley-lake-2.exr" in named["images"]  # panorama.exr; with a sun also ..._sky.exr
    assert all(name.startswith("alpine-valley-lake-2") for name in named["images"]), named["images"]
    assert named["folder"].endswith("-alpine-valley-lake-3")  # <time>-<slug>-<seed>
    assert named["cube material"] == "Material"  # the user's material: never renamed
    assert (named["plane material"], named["plane image"]) == ("Alpine Valley Lake 4", "alpine-valley-lake-4.png"), named
    assert named["titles"] == ["Alpine Valley Lake 4", "Alpine Valley Lake 3", "Alpine Valley Lake 2"]
    sentence = report["job error"]
    assert sentence.startswith("Advanced › Sky Prompt has no view to act on"), sentence
    assert sentence.endswith("use Advanced › View Set: Band + Poles, Ring or Cube."), sentence
    assert sentence in report["message"] and "--" not in report["message"]


def test_variations_make_one_history_item_each_and_cancel_stops_the_batch(extension_zip, tiny_model, tmp_path):
    report = run_blender(with_setup("""
        import threading, time
        settings.prompt, settings.mode = "a misty pine forest", "WORLD"
        settings.randomize_seed, settings.seed, settings.variations = False, 40, 3
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        made = [{"seed": item.seed, "title": item.title, "png": item.png_path, "exr": item.exr_path}
                for item in settings.history]
        worlds = sorted(world.name for world in bpy.data.worlds if world.name.startswith("Misty"))

        # Three more, cancelled while the second denoises (what the Cancel button does: session.cancel).
        settings.mode, settings.seed, settings.steps = "TILE", 50, 200
        def cancel_the_second():
            while True:
                batch = session.current_batch()
                if batch is not None and batch.started == 2 and batch.job.stage == "denoising":
                    session.cancel()
                    return
                time.sleep(0.02)
        threading.Thread(target=cancel_the_second, daemon=True).start()
        result, error = generate()
        batch = session.current_batch()
        runs = [[seed, out_dir, os.path.exists(out_dir)] for seed, _, out_dir in batch.runs]
        print(json.dumps({"made": made, "worlds": worlds, "result": result, "error": error, "started": batch.started,
                          "states": batch.job.state, "runs": runs, "busy": session.is_busy(),
                          "history": [[item.seed, item.mode] for item in settings.history]}))
    """), extension_zip, tiny_model, tmp_path)
    made = report["made"]
    assert [item["seed"] for item in made] == [42, 41, 40]  # newest first
    assert [item["title"] for item in made] == ["Misty Pine Forest 3", "Misty Pine Forest 2", "Misty Pine Forest"]
    assert report["worlds"] == ["Misty Pine Forest", "Misty Pine Forest 2", "Misty Pine Forest 3"]
    # Each its own files, the PNG its history thumbnail.
    assert len({item["png"] for item in made}) == 3 and all(os.path.isfile(item["png"]) for item in made)
    assert all(os.path.isfile(item["exr"]) for item in made)
    # The cancelled batch: the first variation made, the second cancelled, the third never started.
    assert report["result"] == ["CANCELLED"] and report["error"] is None
    assert report["started"] == 2 and report["states"] == "cancelled" and not report["busy"]
    (first, _, first_made), (_, second_dir, _), (_, third_dir, third_made) = report["runs"]
    assert first == 50 and first_made and not third_made
    assert not os.path.exists(os.path.join(second_dir, "panorama.png"))
    assert report["history"][:1] == [[50, "TILE"]] and len(report["history"]) == 4
