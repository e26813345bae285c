"""End to end in headless Blender, continued: wide images, the history (Apply / Reuse), facing the camera,
and restoring the user's World, with the built extension and the real backend (a tiny local model).

One Blender session makes all the generations (the worker stays warm, so the model loads once) and
reports what each step left in the scene; the tests below assert on that report, one concern each.
Needs the backend's dependencies (torch, diffusers), like tests/test_blender_generate.py.
"""

import math
import os

import numpy as np
import pytest

pytest.importorskip("bpy")
pytest.importorskip("diffusers")

from backend.products.images import read_exr  # noqa: E402
from test_blender_generate import extension_zip, run_blender  # noqa: E402,F401  (extension_zip: a fixture)

# The camera's rotation: X 90° turns its view (local -Z) onto +Y, Z 30° then turns that to azimuth 120°.
CAMERA_ROTATION_DEGREES = (90.0, 0.0, 30.0)
CAMERA_AZIMUTH_DEGREES = 90.0 + 30.0

SCRIPT = """
import importlib, math, traceback
import numpy as np

W = importlib.import_module(ADDON + ".blender_addon.scene.world")
scene = bpy.context.scene
user_world = scene.world
assert user_world is not None and not W.is_syncsphere_world(user_world)
camera = scene.camera
camera.rotation_euler = [math.radians(angle) for angle in CAMERA_ROTATION_DEGREES]
report = {"user_world": user_world.name}


def section(name):
    '''Run the decorated step now; record its report, or the traceback if it fails.'''
    def run(step):
        try:
            report[name] = step()
        except Exception:
            report[name] = {"error": traceback.format_exc()}
    return run


def environment_of(world):
    node = world.node_tree.nodes[W.ENVIRONMENT_NODE]
    return bpy.path.abspath(node.image.filepath)


def save_pixels(world, name):
    '''Save what the world's Environment image holds (H, W, 3, top row first) for the test to compare.'''
    image = world.node_tree.nodes[W.ENVIRONMENT_NODE].image
    pixels = np.empty(image.size[0] * image.size[1] * 4, np.float32)
    image.pixels.foreach_get(pixels)
    np.save(os.path.join(os.getcwd(), name), pixels.reshape(image.size[1], image.size[0], 4)[::-1, :, :3])


def history():
    return [{"prompt": item.prompt, "seed": item.seed, "mode": item.mode, "exr": item.exr_path, "png": item.png_path}
            for item in settings.history]


@section("two_worlds")
def two_worlds():
    settings.mode = "WORLD"
    settings.prompt, settings.negative_prompt, settings.guidance = "an old lighthouse", "fog", 5.0
    settings.randomize_seed, settings.seed = False, 11
    assert bpy.ops.syncsphere.generate() == {"FINISHED"}
    first_world = scene.world.name
    # The second one faces the camera, with a random seed.
    settings.prompt, settings.negative_prompt, settings.guidance = "a desert at noon", "", 7.5
    settings.randomize_seed, settings.face_camera = True, True
    assert bpy.ops.syncsphere.generate() == {"FINISHED"}
    second = scene.world
    bpy.context.view_layer.update()
    return {"history": history(), "first_world": first_world, "second_world": second.name,
            "second_is_syncsphere": W.is_syncsphere_world(second),
            "second_rotation": list(second.node_tree.nodes[W.MAPPING_NODE].inputs["Rotation"].default_value),
            "face_camera_rotation": W.face_camera_rotation(camera),
            "second_environment": environment_of(second), "seed_after": settings.seed}


@section("reuse")
def reuse():
    assert bpy.ops.syncsphere.history_reuse(index=1) == {"FINISHED"}
    return {name: getattr(settings, name) for name in
            ("prompt", "negative_prompt", "seed", "randomize_seed", "guidance", "mode", "steps")}


@section("apply")
def apply():
    before = set(bpy.data.worlds.keys())
    assert bpy.ops.syncsphere.history_apply(index=1) == {"FINISHED"}
    applied = scene.world
    save_pixels(applied, "applied.npy")
    return {"new_world": applied.name not in before, "world": applied.name,
            "source": applied[W.SOURCE_PROP], "environment": environment_of(applied),
            "history_length": len(settings.history)}


@section("restore")
def restore():
    assert bpy.ops.syncsphere.restore_world() == {"FINISHED"}
    restored = scene.world.name
    again = sorted(bpy.ops.syncsphere.restore_world())  # the user's World is not SyncSphere's: nothing to do
    return {"world": restored, "again": again, "again_world": scene.world.name}


@section("wide")
def wide():
    settings.mode = "WIDE"
    settings.prompt, settings.randomize_seed, settings.seed = "a mountain range", False, 5
    images_before = set(bpy.data.images.keys())
    assert bpy.ops.syncsphere.generate() == {"FINISHED"}
    png = settings.history[0].png_path
    loaded = [image for image in bpy.data.images if image.filepath
              and os.path.isfile(bpy.path.abspath(image.filepath))
              and os.path.samefile(bpy.path.abspath(image.filepath), png)]
    return {"png": png, "images": [[image.name, list(image.size), image.name not in images_before] for image in loaded],
            "world": scene.world.name, "history": history()}


print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(extension_zip, tiny_model, tmp_path_factory):  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("history-and-modes")
    constants = f"CAMERA_ROTATION_DEGREES = {CAMERA_ROTATION_DEGREES!r}\n"
    result = run_blender(constants + SCRIPT, extension_zip, tiny_model, tmp_path)
    result["tmp_path"] = str(tmp_path)
    return result


def _step(report, name):
    step = report[name]
    assert "error" not in step, step.get("error")
    return step


def test_two_generations_are_two_history_items_newest_first(report):
    step = _step(report, "two_worlds")
    first, second = step["history"][1], step["history"][0]
    assert len(step["history"]) == 2
    assert (first["prompt"], first["seed"], first["mode"]) == ("an old lighthouse", 11, "WORLD")
    assert (second["prompt"], second["mode"]) == ("a desert at noon", "WORLD")
    assert second["seed"] == step["seed_after"]  # the random seed used is shown in the settings
    assert first["exr"] != second["exr"] and os.path.isfile(first["exr"]) and os.path.isfile(second["exr"])
    assert step["second_is_syncsphere"] and step["first_world"] != step["second_world"]
    assert os.path.samefile(step["second_environment"], second["exr"])


def test_reuse_copies_the_older_settings_back_and_stops_randomizing(report):
    reused = _step(report, "reuse")
    assert reused["prompt"] == "an old lighthouse" and reused["negative_prompt"] == "fog"
    assert reused["seed"] == 11 and reused["randomize_seed"] is False
    assert reused["guidance"] == pytest.approx(5.0) and reused["mode"] == "WORLD" and reused["steps"] == 2


def test_apply_makes_a_world_showing_the_older_exr(report):
    older = _step(report, "two_worlds")["history"][1]
    applied = _step(report, "apply")
    assert applied["new_world"] and applied["history_length"] == 2  # applying adds no history item
    assert os.path.samefile(applied["source"], older["exr"])
    assert os.path.samefile(applied["environment"], older["exr"])
    # It shows exactly that EXR, which differs from the newer one.
    pixels = np.load(os.path.join(report["tmp_path"], "applied.npy"))
    np.testing.assert_allclose(pixels, read_exr(older["exr"]), atol=1e-6)
    newer = _step(report, "two_worlds")["history"][0]
    assert np.abs(read_exr(newer["exr"]) - pixels).max() > 1e-3


def test_face_camera_turns_the_world_to_the_camera(report):
    step = _step(report, "two_worlds")
    x, y, z = step["second_rotation"]
    assert (x, y) == (0.0, 0.0)
    # face_camera_rotation returns minus the camera's azimuth (blender_addon/scene/world.py).
    assert z == pytest.approx(step["face_camera_rotation"], abs=1e-6)
    assert z == pytest.approx(-math.radians(CAMERA_AZIMUTH_DEGREES), abs=1e-5)


def test_restore_world_brings_back_the_users_world(report):
    restored = _step(report, "restore")
    assert restored["world"] == report["user_world"]
    assert restored["again"] == ["CANCELLED"] and restored["again_world"] == report["user_world"]


def test_wide_image_is_loaded_at_its_size_and_leaves_the_world_alone(report):
    wide = _step(report, "wide")
    assert len(wide["images"]) == 1, wide["images"]
    name, size, new = wide["images"][0]
    assert size == [2048, 512] and new
    assert wide["world"] == report["user_world"]
    assert [item["mode"] for item in wide["history"]] == ["WIDE", "WORLD", "WORLD"]
    assert wide["history"][0]["prompt"] == "a mountain range" and wide["history"][0]["seed"] == 5
