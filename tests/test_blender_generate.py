"""End to end in headless Blender: the built extension, installed and enabled, generates with the real
backend (a tiny local model) and puts the result into the scene; failures leave the scene as it was."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backend.products.images import read_exr
from test_extension import _blender_ext_tool
from tools.build_extension import build_extension

REPO = Path(__file__).resolve().parent.parent
# The Python that runs headless Blender (the bpy module): this one by default; CI points it at the
# Blender 4.2 environment too. The backend always runs in this interpreter, which has torch.
BLENDER_PYTHON = os.path.abspath(os.environ.get("SYNCSPHERE_TEST_BLENDER_PYTHON", sys.executable))


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory):
    """The extension built with Blender's own tool by tools/build_extension.py, as a user would install it."""
    _blender_ext_tool()  # skips without bpy
    return str(build_extension(tmp_path_factory.mktemp("dist")))


def run_blender(script, extension_zip, tiny_model, tmp_path, timeout=600):
    """Run ``script`` in a fresh headless Blender with SyncSphere installed from the zip and configured
    (backend Python: this interpreter; model: the tiny one; CPU). Returns the JSON the script prints last."""
    prelude = f"""
        import json, os, sys
        os.environ["BLENDER_USER_RESOURCES"] = {str(tmp_path / "blender-user")!r}
        import bpy
        bpy.ops.extensions.package_install_files(filepath={extension_zip!r}, repo="user_default", enable_on_install=True)
        ADDON = "bl_ext.user_default.syncsphere"
        prefs = bpy.context.preferences.addons[ADDON].preferences
        prefs.python_path = {sys.executable!r}
        prefs.default_model = {tiny_model!r}
        prefs.device = "cpu"
        settings = bpy.context.scene.syncsphere
        settings.prompt = "a quiet harbour at dusk"
        settings.steps = 2
        settings.window = 16
        settings.stride = 8
        settings.quality = "BEST"  # dense MultiDiffusion, the cheapest on a CPU; test_quality_* runs the others

        def generate():  # the Generate operator: (sorted result set, None), or (None, the error sentence)
            try:
                return sorted(bpy.ops.syncsphere.generate()), None
            except RuntimeError as error:  # operator errors raise in background mode
                return None, str(error)
        """
    code = textwrap.dedent(prelude) + textwrap.dedent(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([BLENDER_PYTHON, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Blender prints operator reports on stdout too: the script's report is the last JSON line.
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def test_generate_a_360_world_end_to_end(extension_zip, tiny_model, tmp_path):
    report = run_blender("""
        import numpy as np
        user_world = bpy.data.worlds.new("User World")
        bpy.context.scene.world = user_world
        settings.mode = "WORLD"
        settings.randomize_seed = False
        settings.seed = 42
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        world = bpy.context.scene.world
        nodes = world.node_tree.nodes
        environment = next(node for node in nodes if node.type == "TEX_ENVIRONMENT")
        image = environment.image
        pixels = np.array(image.pixels[:], dtype=np.float32).reshape(image.size[1], image.size[0], 4)
        np.save(os.path.join(os.getcwd(), "pixels.npy"), pixels[::-1, :, :3])  # Blender's rows run bottom-up
        links = sorted((link.from_node.type, link.to_node.type) for link in world.node_tree.links)
        item = settings.history[0]
        print(json.dumps({"world": world.name, "links": links, "exr": image.filepath_raw, "history": [item.prompt, item.seed, item.exr_path],
                          "user_world_kept": "User World" in bpy.data.worlds, "user_world_users": bpy.data.worlds["User World"].users}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["world"] != "User World" and report["user_world_kept"]
    report["links"] = [tuple(link) for link in report["links"]]
    assert ("TEX_COORD", "MAPPING") in report["links"] and ("MAPPING", "TEX_ENVIRONMENT") in report["links"]
    # With HDR (the default) and a sun in lighting.json, the panorama reaches the Background through the Sky Mix
    # and a Sun lamp lights the scene (docs/blender.md, "Lighting"); without a sun, directly.
    wired = ("TEX_ENVIRONMENT", "BACKGROUND") in report["links"] or \
        {("TEX_ENVIRONMENT", "MIX"), ("MIX", "BACKGROUND")} <= set(report["links"])
    assert wired and ("BACKGROUND", "OUTPUT_WORLD") in report["links"]
    assert report["history"][:2] == ["a quiet harbour at dusk", 42]
    # The world shows exactly the backend's linear EXR.
    exr = read_exr(report["history"][2])
    pixels = np.load(tmp_path / "pixels.npy")
    assert exr.shape == pixels.shape == (512, 1024, 3)
    np.testing.assert_allclose(pixels, exr, atol=1e-6)


def test_backend_error_is_reported_and_the_scene_is_unchanged(extension_zip, tiny_model, tmp_path):
    report = run_blender("""
        settings.stride = 40  # larger than the window of 16: the backend refuses the request
        worlds_before = sorted(bpy.data.worlds.keys())
        _, message = generate()
        print(json.dumps({"message": message, "same_worlds": sorted(bpy.data.worlds.keys()) == worlds_before,
                          "history": len(settings.history)}))
    """, extension_zip, tiny_model, tmp_path)
    # The backend's sentence, in the panel's words (blender_addon/core/panel_words.py).
    assert report["message"] and "Advanced › Stride 40 is larger than the window" in report["message"]
    assert report["same_worlds"] and report["history"] == 0


def test_tileable_texture_lands_on_the_active_object(extension_zip, tiny_model, tmp_path):
    report = run_blender("""
        bpy.ops.mesh.primitive_cube_add()
        cube = bpy.context.active_object
        settings.mode = "TILE"
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        material = cube.active_material
        texture = next(node for node in material.node_tree.nodes if node.type == "TEX_IMAGE")
        print(json.dumps({"image": texture.image.filepath_raw, "size": list(texture.image.size),
                          "png": settings.history[0].png_path}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["size"] == [512, 512] and os.path.samefile(report["image"], report["png"])


# While the operator waits for the job (background mode), a thread breaks it at its first denoising step.
INTERRUPT_AT_DENOISING = """
    import signal, threading, time
    session = sys.modules[ADDON + ".blender_addon.core.session"]

    def interrupt(action):
        def run():
            # Follow the first job only: if it ends before denoising, a later job must not be interrupted.
            while session.current_job() is None:
                time.sleep(0.05)
            job = session.current_job()
            while job.stage != "denoising" and not job.finished:
                time.sleep(0.05)
            if job.finished:
                return
            if action == "cancel":
                session.cancel()  # what the Cancel operator does
            elif action == "kill":
                os.kill(job.worker.process.pid, signal.SIGKILL)
            elif action == "hang":
                # Only a stopped worker gets the short hang timeout: a cancelled or killed one is waited for
                # with the default, so a step that takes long on a busy machine is never taken for a hang.
                job.hang_timeout_s = 10
                os.kill(job.worker.process.pid, signal.SIGSTOP)
        threading.Thread(target=run, daemon=True).start()
"""


@pytest.mark.parametrize("action", ["cancel", "kill", "hang"])
def test_cancel_or_a_killed_worker_leaves_the_scene_unchanged_and_the_next_job_works(extension_zip, tiny_model, tmp_path, action):
    report = run_blender(textwrap.dedent(INTERRUPT_AT_DENOISING) + textwrap.dedent(f"""
        settings.steps = 400  # long enough to be interrupted mid-denoising; interrupt() gives up a stopped worker after 10 s
        worlds_before = sorted(bpy.data.worlds.keys())
        interrupt({action!r})
        result, error = generate()
        unchanged = sorted(bpy.data.worlds.keys()) == worlds_before and len(settings.history) == 0
        settings.steps = 2  # the next job starts a new worker and loads the model again
        second, second_error = generate()
        print(json.dumps({{"result": result, "error": error, "unchanged": unchanged, "second": second,
                          "second_error": second_error, "history": len(settings.history)}}))
    """), extension_zip, tiny_model, tmp_path)
    assert report["unchanged"]
    if action == "cancel":
        assert report["result"] == ["CANCELLED"] and report["error"] is None, report
    else:
        expected = "stopped unexpectedly" if action == "kill" else "sent nothing for 10 s"
        assert expected in report["error"] and "backend.log" in report["error"]
    assert report["second"] == ["FINISHED"] and report["history"] == 1, report["second_error"]
    assert not list((tmp_path / "blender-user").rglob("panorama.png.partial*"))


def test_bake_to_uv_image_after_a_tileable_texture(extension_zip, tiny_model, tmp_path):
    report = run_blender("""
        import numpy as np
        bpy.ops.mesh.primitive_cube_add()
        settings.mode = "TILE"
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        assert bpy.ops.syncsphere.bake_to_uv(size=64) == {"FINISHED"}
        baked = [image for image in bpy.data.images if image.name.endswith("Baked")][0]
        pixels = np.array(baked.pixels[:]).reshape(64, 64, 4)
        print(json.dumps({"size": list(baked.size), "packed": baked.packed_file is not None, "mean": float(pixels[..., :3].mean())}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["size"] == [64, 64] and report["packed"] and report["mean"] > 0.05


def test_undo_takes_a_generated_world_back_out(extension_zip, tiny_model, tmp_path):
    report = run_blender("""
        user_world = bpy.data.worlds.new("User World")
        bpy.context.scene.world = user_world
        bpy.ops.ed.undo_push(message="before generating")
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        generated = bpy.context.scene.world.name
        bpy.ops.ed.undo()
        print(json.dumps({"generated": generated, "after_undo": bpy.context.scene.world.name,
                          "worlds": sorted(bpy.data.worlds.keys())}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["generated"] != "User World" and report["after_undo"] == "User World"
    assert report["generated"] not in report["worlds"]


def test_syncdiffusion_world_end_to_end(extension_zip, tiny_model, tmp_path):
    """The panel's SyncDiffusion settings reach the backend: the job guides its first step and says so in
    metadata.json, and the world is applied and recorded in the history as SyncDiffusion. Fast Guidance
    without the tiny autoencoder cached (offline) fails with a sentence naming it and changes nothing.

    SyncDiffusion differentiates through the UNet, the VAE decoder and LPIPS' VGG (random weights here,
    offline) for every view, so the test shrinks the Draft world preset to 256x128 (4 views of 16 latents)
    to stay a few seconds on a CPU."""
    report = run_blender("""
        generation = sys.modules[ADDON + ".blender_addon.core.generation"]
        generation.RESOLUTIONS["WORLD"]["DRAFT"] = (256, 128)
        settings.mode = "WORLD"
        settings.randomize_seed, settings.seed = False, 9
        settings.sync_method = "SYNCDIFFUSION"
        settings.sync_weight, settings.sync_steps = 15.0, 1
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        session = sys.modules[ADDON + ".blender_addon.core.session"]
        item = settings.history[0]
        environment = next(node for node in bpy.context.scene.world.node_tree.nodes if node.type == "TEX_ENVIRONMENT")
        metadata = session.current_job().outputs["metadata"]
        # Fast Guidance needs the tiny autoencoder, which is not cached and cannot be downloaded here: the
        # backend accepts the request and the operator reports why it failed.
        settings.sync_fast = True
        worlds = sorted(bpy.data.worlds.keys())
        _, fast_error = generate()
        print(json.dumps({"metadata": metadata, "exr": item.exr_path,
                          "history": [item.sync_method, item.sync_weight, item.sync_steps, item.sync_fast],
                          "environment": bpy.path.abspath(environment.image.filepath), "size": list(environment.image.size),
                          "fast_error": fast_error, "fast_history": len(settings.history),
                          "fast_same_worlds": sorted(bpy.data.worlds.keys()) == worlds}))
    """, extension_zip, tiny_model, tmp_path)
    with open(report["metadata"], encoding="utf-8") as file:
        metadata = json.load(file)
    assert metadata["sync"] == "syncdiffusion"
    assert metadata["syncdiffusion"]["loss_pretrained"] is False  # offline: the artist is warned (result_warnings)
    params = metadata["params"]
    assert (params["sync"], params["sync_weight"], params["sync_steps"]) == ("syncdiffusion", 15.0, 1)
    assert (params["sync_decoder"], params["sync_reuse_eps"], params["sync_loss_size"]) == ("vae", False, None)
    assert (params["width"], params["height"], params["steps"]) == (256, 128, 2)
    assert report["history"] == ["SYNCDIFFUSION", 15.0, 1, False]
    assert os.path.samefile(report["environment"], report["exr"]) and report["size"] == [256, 128]
    assert report["fast_error"] and "madebyollin/taesd" in report["fast_error"], report["fast_error"]
    assert report["fast_history"] == 1 and report["fast_same_worlds"]


def test_quality_fast_and_balanced_run_the_shifted_schedule_end_to_end(extension_zip, tiny_model, tmp_path):
    """Fast on a World and the default Quality (Balanced: the backend's measured default, shifted for a texture)
    on a Tileable Texture reach the backend as such from the panel's settings, and the history says how each ran
    (metadata.json's schedule and views per step). The Stride is left to the backend (0), as it must be for the
    shifted schedule; a 256x128 world is 4 windows of 16 latents per step."""
    report = run_blender("""
        generation = sys.modules[ADDON + ".blender_addon.core.generation"]
        session = sys.modules[ADDON + ".blender_addon.core.session"]
        generation.RESOLUTIONS["WORLD"]["DRAFT"] = (256, 128)
        settings.stride = 0
        settings.randomize_seed, settings.seed = False, 5
        runs = {}
        for quality, mode in (("FAST", "WORLD"), ("BALANCED", "TILE")):
            settings.quality, settings.mode = quality, mode
            if mode == "TILE":
                bpy.ops.mesh.primitive_cube_add()
            assert bpy.ops.syncsphere.generate() == {"FINISHED"}
            item = settings.history[0]
            runs[quality] = {"metadata": session.current_job().outputs["metadata"], "summary": item.run_summary,
                             "history": [item.quality, item.sync_method]}
        print(json.dumps(runs))
    """, extension_zip, tiny_model, tmp_path)
    for quality in ("FAST", "BALANCED"):
        run = report[quality]
        with open(run["metadata"], encoding="utf-8") as file:
            metadata = json.load(file)
        assert (metadata["schedule"], metadata["sync"]) == ("shifted", "multidiffusion")
        assert run["history"] == [quality, "AUTO"]
        per_step = metadata["views_per_step"]
        assert run["summary"].startswith("Shifted schedule, ") and f"{round(per_step['mean'], 1):g} views per step" in run["summary"]
        # The shifted schedule's windows are a window apart (16 latents for the tiny model).
        assert metadata["params"]["stride"] == 16
