"""Issue 18 end to end in headless Blender with the real backend (a tiny local model, 1-2 steps, small sizes): Start
from Image with a file and with the World's image, Upscale x2 of a history item, Extend Photo, and a custom size the
backend would refuse, refused before any job starts (docs/blender.md, "Image input and 8K")."""

import json
import os

import numpy as np
from PIL import Image

from test_blender_generate import extension_zip, run_blender  # noqa: F401 (a fixture)


def test_start_from_image_upscale_and_a_bad_custom_size(extension_zip, tiny_model, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (256, 128), (40, 90, 200)).save(start)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (220, 60, 30)).save(photo)
    report = run_blender(f"""
        import numpy as np
        session = sys.modules[ADDON + ".blender_addon.core.session"]
        settings.mode = "WORLD"
        settings.resolution = "CUSTOM"
        settings.randomize_seed = False
        settings.seed = 5
        report = {{}}

        # A custom size the backend would refuse is refused before any job (no worker, nothing in the history).
        settings.custom_width, settings.custom_height = 1004, 502
        report["bad size"] = generate()
        report["no job"] = session.current_batch() is None and len(settings.history) == 0

        # Start from a file at strength 0.5 (1 of 2 steps): a new World, the user's kept.
        user_world = bpy.data.worlds.new("User World")
        bpy.context.scene.world = user_world
        settings.custom_width, settings.custom_height = 256, 128
        settings.start_image_source, settings.start_image_path, settings.strength = "FILE", {str(start)!r}, 0.5
        report["from file"] = generate()
        if not settings.history:  # failed: the report says why
            print(json.dumps(report))
            raise SystemExit(0)
        first_title, first_png = settings.history[0].title, settings.history[0].png_path
        with open(os.path.join(os.path.dirname(first_png), "metadata.json")) as file:
            report["file metadata"] = json.load(file)
        report["file world"] = bpy.context.scene.world.name

        # Upscale it x2: a new history item twice the size, a new World, the first item and World kept.
        report["upscale"] = sorted(bpy.ops.syncsphere.history_upscale(index=0, scale=2))
        upscaled = settings.history[0]
        report["upscaled"] = [upscaled.title, first_title, list(bpy.data.images.load(upscaled.png_path).size),
                              list(bpy.data.images.load(settings.history[1].png_path).size), len(settings.history),
                              settings.history[1].png_path == first_png]
        report["upscaled world"] = bpy.context.scene.world.name
        report["worlds kept"] = all(name in bpy.data.worlds for name in ("User World", report["file world"]))

        # Start from the World's image: a generated (unsaved) image on the user's own World is saved for the backend
        # and left as it was.
        image = bpy.data.images.new("Painted Sky", 64, 32, float_buffer=True)
        image.pixels.foreach_set(np.full(64 * 32 * 4, 0.5, dtype=np.float32))
        before = (image.name, image.filepath_raw, image.source, list(image.size))
        painted = bpy.data.worlds.new("Painted World")
        painted.use_nodes = True
        environment = painted.node_tree.nodes.new("ShaderNodeTexEnvironment")
        environment.image = image
        bpy.context.scene.world = painted
        settings.start_image_source = "WORLD"
        report["from world"] = generate()
        with open(os.path.join(os.path.dirname(settings.history[0].png_path), "metadata.json")) as file:
            report["world metadata"] = json.load(file)
        report["image kept"] = [list(before), [image.name, image.filepath_raw, image.source, list(image.size)],
                                environment.image == image, "Painted World" in bpy.data.worlds]

        # A World without an image: one sentence, no job.
        bpy.context.scene.world = bpy.data.worlds.new("Empty World")
        count = len(settings.history)
        report["no world image"] = [generate(), len(settings.history) == count]

        # Extend Photo: the photo kept where its camera saw it (90° across, 30° to the right).
        bpy.context.scene.world = user_world
        settings.start_image_source = "NONE"
        settings.extend_photo, settings.photo_path = True, {str(photo)!r}
        settings.photo_fov, settings.photo_yaw, settings.photo_pitch = 90.0, 30.0, 0.0
        report["photo"] = generate()
        report["photo png"] = settings.history[0].png_path
        print(json.dumps(report))
    """, extension_zip, tiny_model, tmp_path)
    result, message = report["bad size"]
    assert result is None and "The custom Width 1004 px is not a multiple of 8 px" in message, message
    assert report["no job"]
    assert report["from file"] == [["FINISHED"], None], report["from file"]
    start_record = report["file metadata"]["start"]
    assert start_record["strength"] == 0.5, start_record
    assert report["file world"] not in ("User World",)
    assert report["upscale"] == ["FINISHED"]
    title, first_title, size, first_size, count, first_kept = report["upscaled"]
    assert size == [512, 256] and first_size == [256, 128] and count == 2 and first_kept
    assert title == f"{first_title} x2"
    assert report["upscaled world"] != report["file world"] and report["worlds kept"]
    assert report["from world"] == [["FINISHED"], None], report["from world"]
    assert "start" in report["world metadata"]
    before, after, same_node_image, world_kept = report["image kept"]
    assert before == after and same_node_image and world_kept
    (result, message), unchanged = report["no world image"]
    assert result is None and "The scene's World has no image to start from" in message and unchanged
    assert report["photo"] == [["FINISHED"], None], report["photo"]
    # The photo's region of the World's image is the photo (within 3/255 where the composite's weight is 1).
    from backend.engine.photo_region import photo_region

    region = photo_region(np.asarray(Image.open(photo), np.float32) / 255, 90.0, 30.0, 0.0, 256, 128)
    painted = np.asarray(Image.open(report["photo png"]).convert("RGB"), np.float32) / 255
    kept = region.alpha == 1
    assert kept.sum() > 100 and np.abs(painted[kept] - region.pixels[kept]).mean() <= 3 / 255
    params = json.load(open(os.path.join(os.path.dirname(report["photo png"]), "metadata.json")))["params"]
    assert (params["photo"], params["photo_fov"], params["photo_yaw"]) == (str(photo), 90.0, 30.0)
