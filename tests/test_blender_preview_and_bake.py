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
