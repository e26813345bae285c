"""End to end in headless Blender (issue 21): the preview while a job paints, and a baked texture that
survives saving and reopening the .blend; with the built extension installed by Blender's own tool and the
real backend (a tiny local model). Needs the backend's dependencies (torch, diffusers), like
tests/test_blender_generate.py.
"""

import pytest

pytest.importorskip("bpy")
pytest.importorskip("diffusers")

import test_blender_generate  # noqa: E402
from test_blender_generate import run_blender  # noqa: E402
from test_blender_panels import _blender, _props  # noqa: E402

extension_zip = test_blender_generate.extension_zip  # the fixture: the extension built with Blender's own tool


def test_bake_to_uv_image_is_kept_through_save_and_reopen(extension_zip, tiny_model, tmp_path):
    """Generate a tileable texture on a cube, Bake to UV Image, save the .blend and open it again: the baked
    image is there, packed, with the same pixels, and the cube's material shows it (its Base Color comes from
    the baked image on the cube's UV map), while the generated texture's nodes are still in the material."""
    report = run_blender("""
        import numpy as np
        material_module = sys.modules[ADDON + ".blender_addon.scene.material"]
        bpy.ops.mesh.primitive_cube_add()
        cube_name = bpy.context.active_object.name
        settings.mode = "TILE"
        assert bpy.ops.syncsphere.generate() == {"FINISHED"}
        assert bpy.ops.syncsphere.bake_to_uv(size=64) == {"FINISHED"}
        baked = next(image for image in bpy.data.images if image.name.endswith("Baked"))
        name, users = baked.name, baked.users
        pixels = np.empty(64 * 64 * 4, dtype=np.float32)
        baked.pixels.foreach_get(pixels)
        blend = os.path.join(os.getcwd(), "scene.blend")
        bpy.ops.wm.save_as_mainfile(filepath=blend)
        bpy.ops.wm.read_homefile(use_empty=True)  # nothing of the scene left in memory
        assert name not in bpy.data.images
        bpy.ops.wm.open_mainfile(filepath=blend)
        reopened = bpy.data.images.get(name)
        reread = np.empty(64 * 64 * 4, dtype=np.float32)
        reopened.pixels.foreach_get(reread)
        tree = bpy.data.objects[cube_name].active_material.node_tree
        base_colour = next(node for node in tree.nodes if node.type == "BSDF_PRINCIPLED").inputs["Base Color"]
        feeding = base_colour.links[0].from_node
        print(json.dumps({"users_before_save": users, "packed": reopened.packed_file is not None,
                          "size": list(reopened.size), "same_pixels": bool(np.abs(reread - pixels).max() <= 1 / 255),
                          "mean": float(reread.reshape(-1, 4)[:, :3].mean()),
                          "base_colour_from": [feeding.name, feeding.image.name if feeding.image else None],
                          "uv_map": tree.nodes[material_module.BAKED_UV_NODE].uv_map,
                          "generated_texture_kept": material_module.TEXTURE_NODE in tree.nodes}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["users_before_save"] >= 1
    assert report["packed"] and report["size"] == [64, 64] and report["same_pixels"] and report["mean"] > 0.05
    assert report["base_colour_from"][0] == "SyncSphere Baked Texture" and report["base_colour_from"][1].endswith("Baked")
    assert report["uv_map"] == "UVMap" and report["generated_texture_kept"]


def test_previews_arrive_while_a_world_job_runs_and_show_in_the_image_and_live_in_the_world(extension_zip, tiny_model,
                                                                                           tmp_path):
    """A 360° World job started as Generate starts it (its ``prepare``, then the batch), followed as its modal
    timer follows it (``poll``, then ``preview.follow_job``), with Live Preview in World on: the backend's previews
    (every 5th step and the last, its default) arrive while the job runs; each is copied into the image
    "SyncSphere Preview" with the canvas's aspect (the latent canvas: 1024 x 512 px / 8) and shown by a temporary
    World; when the job ends the scene has its own World again and the temporary one is gone."""
    report = run_blender("""
        import time
        import numpy as np
        generate_module = sys.modules[ADDON + ".operators.generate"]
        preview = sys.modules[ADDON + ".blender_addon.scene.preview"]
        session = sys.modules[ADDON + ".blender_addon.core.session"]
        scene = bpy.context.scene
        user_world = bpy.data.worlds.new("User World")
        scene.world = user_world
        settings.mode = "WORLD"
        settings.steps = 30
        settings.preview_in_world = True
        worker, runs, problem = generate_module.SYNCSPHERE_OT_generate.prepare(
            bpy.context, settings, prefs, prefs.python_path)
        assert problem is None, problem
        job = session.start_batch(worker, runs).job
        shown = []
        while not job.finished:
            job.poll(wait_s=0.1)
            image = preview.follow_job(bpy.context, job)
            if image is not None:
                pixels = np.empty(image.size[0] * image.size[1] * 4, dtype=np.float32)
                image.pixels.foreach_get(pixels)
                world = scene.world
                environment = next(node for node in world.node_tree.nodes if node.type == "TEX_ENVIRONMENT")
                shown.append({"step": job.preview_step, "total": job.preview_total, "stage": job.stage,
                              "finished": job.finished, "size": list(image.size), "std": float(pixels.std()),
                              "world": world.name, "world_shows_it": environment.image == image})
        preview.follow_job(bpy.context, job)  # the tick on which the operator sees the end
        print(json.dumps({"state": job.state, "shown": shown, "count": job.preview_count,
                          "world_after": scene.world.name if scene.world else None,
                          "worlds": sorted(bpy.data.worlds.keys()),
                          "preview_file_left": os.path.exists(os.path.join(runs[0][2], ".syncsphere-preview.png"))}))
    """, extension_zip, tiny_model, tmp_path)
    assert report["state"] == "done"
    shown = report["shown"]
    assert len(shown) >= 2 and report["count"] >= len(shown)  # while it ran, before its end
    assert all(item["step"] % 5 == 0 and item["total"] == 30 and not item["finished"] for item in shown)
    assert [item["step"] for item in shown] == sorted({item["step"] for item in shown})  # new ones, in order
    assert all(item["size"] == [128, 64] and item["std"] > 0.001 for item in shown)  # 2:1, a picture
    assert all(item["world"] == "SyncSphere Preview World" and item["world_shows_it"] for item in shown)
    assert report["world_after"] == "User World" and "SyncSphere Preview World" not in report["worlds"]
    assert not report["preview_file_left"]


def test_the_main_panel_draws_the_preview_while_a_job_runs(tmp_path):
    """Under the progress bar and Cancel: the preview image's icon and the step it shows, once the job has sent
    one; nothing before the first preview or once the job has ended. The Result panel has Live Preview in World for
    a World only."""
    states = _blender("""
from syncsphere.blender_addon.scene import preview
png = write_png("preview.png", size=(32, 16), colour=(0.2, 0.5, 0.9))
image = preview.show_preview(png)
assert image is not None and tuple(image.size) == (32, 16)
pixels = np.empty(32 * 16 * 4, dtype=np.float32)
image.pixels.foreach_get(pixels)
colour = [round(float(value), 3) for value in pixels.reshape(-1, 4)[0, :3]]
os.remove(png)
missing = preview.show_preview(png)  # the backend deleted it: nothing changes

def job_state(**state):
    made = session.Batch(None, [(1, {"layout": "equirect"}, os.path.abspath("out"))])
    made.job, made.started = session.GenerationJob(None, {}, os.path.abspath("out")), 1
    for name, value in state.items():
        setattr(made.job, name, value)
    return made

def summary(calls):
    return {"methods": [call["method"] for call in calls],
            "icons": [call["args"] for call in calls if call["method"] == "template_icon"],
            "labels": [call["args"]["text"] for call in calls if call["method"] == "label"]}

states = {"colour": colour, "missing": missing is None}
session._batch = job_state(state="running", stage="denoising", step=3, total=10)
states["before the first"] = summary(draw("SYNCSPHERE_PT_view3d"))
session._batch = job_state(state="running", stage="denoising", step=6, total=10, preview="x.png", preview_step=5,
                           preview_total=10, preview_count=1)
states["with a preview"] = summary(draw("SYNCSPHERE_PT_view3d"))
session._batch = job_state(state="done", stage="writing", step=1, total=1, preview="x.png", preview_step=10,
                           preview_total=10, preview_count=2)
states["done"] = summary(draw("SYNCSPHERE_PT_view3d"))
session._batch = None
for mode in ("WORLD", "TILE"):
    settings.mode = mode
    states[mode] = draw("SYNCSPHERE_PT_view3d_result")
result(states)
""", tmp_path)
    # 8-bit sRGB values copied as they are (0.2 * 255 = 51 -> 0.2).
    assert states["colour"] == pytest.approx([0.2, 0.5, 0.9], abs=1 / 255) and states["missing"]
    assert "template_icon" not in states["before the first"]["methods"]
    drawn = states["with a preview"]
    assert len(drawn["icons"]) == 1 and drawn["icons"][0]["scale"] == 8.0 and drawn["icons"][0]["icon_value"] >= 0
    assert "Preview of step 5/10" in drawn["labels"]
    assert drawn["methods"].index("template_icon") > drawn["methods"].index("progress")
    assert not states["done"]["icons"]
    assert "preview_in_world" in _props(states["WORLD"], "settings")
    assert "preview_in_world" not in _props(states["TILE"], "settings")
