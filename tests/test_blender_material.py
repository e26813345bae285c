"""The material applier in headless Blender: tiling texture wiring, re-applying, scale, baking to UVs.

Run with ``python -m pytest tests/test_blender_material.py`` in an environment that has the ``bpy``
module (5.0 and 4.2 LTS both). Like tests/test_extension.py, every test runs its Blender code in a fresh
interpreter, so the pytest process never imports bpy (it may share a process with torch in the full
suite) and no test sees another's scene. No torch is needed.
"""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")


# Prepended to each test's Blender code. The repository folder's name differs between checkouts, so the
# root package is created from its __init__.py under the fixed name "syncsphere" (as test_extension.py
# does, and as Blender loads it under "bl_ext.<repository>.syncsphere"). Its __init__ is not run: these
# tests only need blender_addon/scene/, not the operators and panels that the root package imports.
_PRELUDE = f"""
import importlib, importlib.util, os, sys, warnings
import bpy
import numpy as np

REPO = {str(REPO)!r}

spec = importlib.util.spec_from_file_location("syncsphere", REPO + "/__init__.py",
                                              submodule_search_locations=[REPO])
sys.modules["syncsphere"] = importlib.util.module_from_spec(spec)
material = importlib.import_module("syncsphere.blender_addon.scene.material")
assert "torch" not in sys.modules

context = bpy.context
scene = context.scene

# Two checker colours (sRGB-encoded, as stored in the PNG), 16 x 16 texel cells on a 128 x 128 tile: every
# face of the default cube's UV layout (0.25 UV units square) covers 2 x 2 whole cells, so the baked
# mean equals the texture's mean. Cells this wide keep the texels that linear filtering blends at cell
# edges (about one texel per edge) a small share.
COLOUR_A = (0.9, 0.3, 0.2)
COLOUR_B = (0.2, 0.6, 0.8)
MEAN = tuple((a + b) / 2 for a, b in zip(COLOUR_A, COLOUR_B))


def write_checker(path, colour_a=COLOUR_A, colour_b=COLOUR_B, size=128, cell=16):
    '''Write a tileable sRGB checker PNG (``path`` is in the working folder) and return its full path.'''
    path = os.path.join(os.getcwd(), path)
    image = bpy.data.images.new("checker source", size, size)
    rows, cols = np.indices((size, size)) // cell
    odd = ((rows + cols) % 2).astype(bool)
    pixels = np.ones((size, size, 4), dtype=np.float32)
    pixels[odd, :3] = colour_a
    pixels[~odd, :3] = colour_b
    image.pixels.foreach_set(pixels.ravel())
    image.filepath_raw = path
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)
    return path


def new_cube(name="Test Cube"):
    '''Add a cube (with the primitive's UV map and no material) and return it.'''
    bpy.ops.mesh.primitive_cube_add()
    cube = context.view_layer.objects.active
    cube.name = name
    assert len(cube.data.uv_layers) == 1 and not cube.material_slots
    return cube


def links_of(material):
    '''Return the material's links as (from node, from socket, to node, to socket) names.'''
    return sorted((l.from_node.name, l.from_socket.name, l.to_node.name, l.to_socket.name)
                  for l in material.node_tree.links)


def baked_pixels(image):
    '''Return the image's RGB texels that the bake wrote (texels outside the UV islands stay black).'''
    rgba = np.empty(image.size[0] * image.size[1] * 4, dtype=np.float32)
    image.pixels.foreach_get(rgba)
    rgb = rgba.reshape(-1, 4)[:, :3]
    return rgb[rgb.max(axis=1) > 0]
"""


def _run_blender(code, tmp_path, timeout=120):
    """Run ``code`` after the prelude in a fresh interpreter; fail with its output when it fails."""
    # A script file rather than "-c", so a failing assert's traceback shows its source line.
    script = tmp_path / "blender_test.py"
    script.write_text(_PRELUDE + textwrap.dedent(code), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"


# --- applying a texture --------------------------------------------------------------------------


def test_apply_wires_uv_mapping_texture_into_base_color(tmp_path):
    """A cube without material gets "SyncSphere Material": UV -> Mapping -> Image (repeat) -> Base Color."""
    _run_blender("""
        path = write_checker("checker.png")
        cube = new_cube()
        # Blender 5.0 deprecates Material.use_nodes: the applier must not touch it there. Warnings are
        # recorded, not raised: Blender's C code would swallow an exception raised inside it.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mat = material.apply_tile_texture(cube, path, scale=2.0)
        assert not [w for w in caught if "use_nodes" in str(w.message)], [str(w.message) for w in caught]

        assert mat.name == "SyncSphere Material" and cube.active_material == mat
        assert len(cube.material_slots) == 1
        nodes = mat.node_tree.nodes
        texture, mapping = nodes["SyncSphere Texture"], nodes["SyncSphere Mapping"]
        assert texture.bl_idname == "ShaderNodeTexImage" and mapping.bl_idname == "ShaderNodeMapping"
        assert texture.extension == "REPEAT"
        assert texture.image.filepath.endswith("checker.png")
        assert texture.image.colorspace_settings.name == "sRGB"
        assert tuple(mapping.inputs["Scale"].default_value) == (2.0, 2.0, 1.0)

        principled = [n for n in nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"]
        assert len(principled) == 1
        links = links_of(mat)
        for expected in [
            ("SyncSphere Texture Coordinate", "UV", "SyncSphere Mapping", "Vector"),
            ("SyncSphere Mapping", "Vector", "SyncSphere Texture", "Vector"),
            ("SyncSphere Texture", "Color", principled[0].name, "Base Color"),
            (principled[0].name, "BSDF", "Material Output", "Surface"),
        ]:
            assert expected in links, (expected, links)
        assert len(links) == 4, links
    """, tmp_path)


def test_reapplying_swaps_the_image_in_the_same_nodes_and_scale_can_change(tmp_path):
    """A second texture replaces the first in the same nodes; set_tile_scale changes the mapping only."""
    _run_blender("""
        first = write_checker("first.png")
        second = write_checker("second.png", colour_a=(0.1, 0.1, 0.1), colour_b=(0.7, 0.7, 0.2))
        cube = new_cube()
        materials = len(bpy.data.materials)
        mat = material.apply_tile_texture(cube, first)
        assert len(bpy.data.materials) == materials + 1
        names, links = sorted(n.name for n in mat.node_tree.nodes), links_of(mat)
        assert tuple(mat.node_tree.nodes["SyncSphere Mapping"].inputs["Scale"].default_value) == (1, 1, 1)

        again = material.apply_tile_texture(cube, second, scale=3.0)
        assert again == mat and len(bpy.data.materials) == materials + 1 and len(cube.material_slots) == 1
        assert sorted(n.name for n in mat.node_tree.nodes) == names  # no stacked nodes
        assert links_of(mat) == links  # no duplicated links
        nodes = mat.node_tree.nodes
        assert nodes["SyncSphere Texture"].image.filepath.endswith("second.png")
        assert tuple(nodes["SyncSphere Mapping"].inputs["Scale"].default_value) == (3.0, 3.0, 1.0)

        material.set_tile_scale(mat, 0.5)
        assert tuple(nodes["SyncSphere Mapping"].inputs["Scale"].default_value) == (0.5, 0.5, 1.0)
        assert links_of(mat) == links

        for bad in (0, -1.0, float("nan")):
            try:
                material.set_tile_scale(mat, bad)
            except ValueError:
                pass
            else:
                raise AssertionError(f"scale {bad} was accepted")
        plain = bpy.data.materials.new("Plain")
        try:
            material.set_tile_scale(plain, 2.0)
        except ValueError as error:
            assert "apply a texture first" in str(error)
        else:
            raise AssertionError("set_tile_scale accepted a material without SyncSphere nodes")
    """, tmp_path)


def test_existing_user_material_keeps_its_other_nodes(tmp_path):
    """The user's material is reused: only Base Color is rewired, every other node and link stays."""
    _run_blender("""
        path = write_checker("checker.png")
        cube = new_cube()
        user = bpy.data.materials.new("User Material")
        if bpy.app.version < (5, 0, 0):
            user.use_nodes = True
        cube.data.materials.append(user)
        tree = user.node_tree
        principled = tree.nodes["Principled BSDF"]
        principled.inputs["Metallic"].default_value = 0.25
        noise = tree.nodes.new("ShaderNodeTexNoise")
        bump = tree.nodes.new("ShaderNodeBump")
        tint = tree.nodes.new("ShaderNodeRGB")  # the user's old colour source: unlinked, not deleted
        tree.links.new(noise.outputs["Fac"], principled.inputs["Roughness"])
        tree.links.new(noise.outputs["Fac"], bump.inputs["Height"])
        tree.links.new(bump.outputs["Normal"], principled.inputs["Normal"])
        tree.links.new(tint.outputs["Color"], principled.inputs["Base Color"])
        before_nodes = {n.name for n in tree.nodes}
        before_links = set(links_of(user))

        mat = material.apply_tile_texture(cube, path)

        assert mat == user and "SyncSphere Material" not in bpy.data.materials
        after_nodes = {n.name for n in tree.nodes}
        assert before_nodes <= after_nodes
        assert after_nodes - before_nodes == {"SyncSphere Texture Coordinate", "SyncSphere Mapping",
                                              "SyncSphere Texture"}
        after_links = set(links_of(mat))
        assert before_links - after_links == {(tint.name, "Color", principled.name, "Base Color")}
        fac = noise.outputs["Fac"].name  # "Factor" in Blender 5.0, "Fac" in 4.2
        assert (noise.name, fac, principled.name, "Roughness") in after_links
        assert (bump.name, "Normal", principled.name, "Normal") in after_links
        assert ("SyncSphere Texture", "Color", principled.name, "Base Color") in after_links
        assert principled.inputs["Metallic"].default_value == 0.25
        assert sum(n.bl_idname == "ShaderNodeBsdfPrincipled" for n in tree.nodes) == 1
    """, tmp_path)


def test_the_texture_goes_to_the_principled_bsdf_that_renders(tmp_path):
    """A Principled BSDF behind a Mix Shader is used; one that feeds nothing is not: a material without
    a rendering Principled BSDF gets a new one on its output, and the user's shaders are kept."""
    _run_blender("""
        path = write_checker("checker.png")

        def user_material(name):
            mat = bpy.data.materials.new(name)
            if bpy.app.version < (5, 0, 0):
                mat.use_nodes = True
            return mat, mat.node_tree, mat.node_tree.nodes["Principled BSDF"]

        mixed, tree, principled = user_material("Mixed")
        mix = tree.nodes.new("ShaderNodeMixShader")
        glossy = tree.nodes.new("ShaderNodeBsdfGlossy")
        tree.links.new(principled.outputs["BSDF"], mix.inputs[1])
        tree.links.new(glossy.outputs["BSDF"], mix.inputs[2])
        tree.links.new(mix.outputs["Shader"], tree.nodes["Material Output"].inputs["Surface"])
        cube = new_cube("Mixed Cube")
        cube.data.materials.append(mixed)
        material.apply_tile_texture(cube, path)
        assert sum(n.bl_idname == "ShaderNodeBsdfPrincipled" for n in tree.nodes) == 1
        assert ("SyncSphere Texture", "Color", principled.name, "Base Color") in links_of(mixed)
        assert (mix.name, "Shader", "Material Output", "Surface") in links_of(mixed)

        diffuse_only, tree, dangling = user_material("Diffuse Only")
        diffuse = tree.nodes.new("ShaderNodeBsdfDiffuse")
        tree.links.new(diffuse.outputs["BSDF"], tree.nodes["Material Output"].inputs["Surface"])
        cube = new_cube("Diffuse Cube")
        cube.data.materials.append(diffuse_only)
        material.apply_tile_texture(cube, path)
        principled = [n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"]
        assert len(principled) == 2 and diffuse.name in tree.nodes and dangling.name in tree.nodes
        new = next(n for n in principled if n != dangling)
        links = links_of(diffuse_only)
        assert (new.name, "BSDF", "Material Output", "Surface") in links
        assert ("SyncSphere Texture", "Color", new.name, "Base Color") in links
        assert not dangling.inputs["Base Color"].is_linked
    """, tmp_path)


# --- baking --------------------------------------------------------------------------------------

# Shared by the bake tests: the scene state a user might have, recorded to check it is given back.
# check_bake compares with the globals ``before``, ``nodes_before`` and ``links_before`` that each test
# sets before baking. Dedent this and the test's code separately: their indents differ.
_BAKE_SETUP = """
    path = write_checker("checker.png")
    camera = bpy.data.objects["Camera"]
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.cycles.samples = 77
    scene.cycles.bake_type = "AO"
    scene.render.bake.margin = 5

    def scene_state():
        return (scene.render.engine, scene.cycles.samples, scene.cycles.device, scene.cycles.bake_type,
                scene.render.bake.margin,
                sorted(o.name for o in context.view_layer.objects if o.select_get()),
                context.view_layer.objects.active.name)

    def check_bake(cube, mat, image, size):
        assert image.size[0] == image.size[1] == size and image.packed_file is not None
        assert image.name in bpy.data.images
        texels = baked_pixels(image)
        assert len(texels) > 0.4 * size * size, len(texels)  # the UV islands were filled
        mean = texels.mean(axis=0)
        assert np.allclose(mean, MEAN, atol=0.03), (mean, MEAN)
        # The checker itself came through (not just its average): most texels are one of its colours.
        near_a = np.abs(texels - COLOUR_A).max(axis=1) < 0.03
        near_b = np.abs(texels - COLOUR_B).max(axis=1) < 0.03
        assert (near_a | near_b).mean() > 0.8, (near_a.mean(), near_b.mean())
        assert near_a.mean() > 0.3 and near_b.mean() > 0.3
        assert scene_state() == before, (scene_state(), before)
        # The temporary nodes are gone; the baked image's UV Map and Image Texture were added, and feed the
        # Base Color in place of the generated texture, whose nodes stay.
        assert {n.name for n in mat.node_tree.nodes} == nodes_before | {material.BAKED_UV_NODE, material.BAKED_TEXTURE_NODE}
        uv_map = mat.node_tree.nodes[material.BAKED_UV_NODE].uv_map
        assert uv_map == cube.data.uv_layers.active.name
        assert mat.node_tree.nodes[material.BAKED_TEXTURE_NODE].image == image and image.users >= 1
        base_colour = [link for link in links_before if link[3] == "Base Color"]
        assert len(base_colour) == 1 and base_colour[0][0] == material.TEXTURE_NODE
        principled = base_colour[0][2]
        assert links_of(mat) == sorted([link for link in links_before if link != base_colour[0]] + [
            (material.BAKED_UV_NODE, "UV", material.BAKED_TEXTURE_NODE, "Vector"),
            (material.BAKED_TEXTURE_NODE, "Color", principled, "Base Color")])
        assert material.materials_showing(cube, image) == [mat.name]
"""


def test_bake_cube_reproduces_the_texture_on_its_uvs(tmp_path):
    """Baking a textured cube gives a new packed image with the texture's colours; the scene is restored."""
    _run_blender(textwrap.dedent(_BAKE_SETUP) + textwrap.dedent("""
        cube = new_cube()
        mat = material.apply_tile_texture(cube, path)
        # The user's selection and active object differ from the baked object.
        cube.select_set(False)
        camera.select_set(True)
        context.view_layer.objects.active = camera
        before = scene_state()
        nodes_before, links_before = {n.name for n in mat.node_tree.nodes}, links_of(mat)
        images_before = len(bpy.data.images)

        image = material.bake_to_uv_image(context, cube, size=128, name="Cube Bake")
        assert image.name == "Cube Bake" and len(bpy.data.images) == images_before + 1
        assert [uv.name for uv in cube.data.uv_layers] == ["UVMap"]  # the existing UV map was used
        check_bake(cube, mat, image, 128)
    """), tmp_path)


def test_bake_mesh_without_uvs_unwraps_it_first(tmp_path):
    """A mesh with no UV map gets one from Smart UV Project, then bakes like any other."""
    _run_blender(textwrap.dedent(_BAKE_SETUP) + textwrap.dedent("""
        cube = new_cube()
        mat = material.apply_tile_texture(cube, path)
        while cube.data.uv_layers:
            cube.data.uv_layers.remove(cube.data.uv_layers[0])
        before = scene_state()
        nodes_before, links_before = {n.name for n in mat.node_tree.nodes}, links_of(mat)

        image = material.bake_to_uv_image(context, cube, size=128)
        assert image.name == "Test Cube Baked"
        assert len(cube.data.uv_layers) == 1 and cube.mode == "OBJECT"
        uvs = np.empty(2 * len(cube.data.loops), dtype=np.float32)
        cube.data.uv_layers[0].data.foreach_get("uv", uvs)
        assert uvs.min() >= 0 and uvs.max() <= 1 and np.ptp(uvs) > 0.5  # a real unwrap, not all zero
        check_bake(cube, mat, image, 128)
    """), tmp_path)


def test_bake_takes_the_base_colour_even_of_a_metallic_material(tmp_path):
    """The bake writes the material's colour itself, not lit or diffuse-only shading (black for metal)."""
    _run_blender("""
        cube = new_cube()
        mat = bpy.data.materials.new("Gold")
        if bpy.app.version < (5, 0, 0):
            mat.use_nodes = True
        principled = mat.node_tree.nodes["Principled BSDF"]
        principled.inputs["Base Color"].default_value = (0.6, 0.3, 0.05, 1.0)  # linear
        principled.inputs["Metallic"].default_value = 1.0
        cube.data.materials.append(mat)

        image = material.bake_to_uv_image(context, cube, size=32)
        texels = baked_pixels(image)
        linear = np.where(texels <= 0.04045, texels / 12.92, ((texels + 0.055) / 1.055) ** 2.4)
        assert np.allclose(linear.mean(axis=0), (0.6, 0.3, 0.05), atol=0.01), linear.mean(axis=0)
        assert principled.inputs["Metallic"].default_value == 1.0
        assert [n.bl_idname for n in mat.node_tree.nodes].count("ShaderNodeEmission") == 0
    """, tmp_path)


def test_a_baked_image_survives_save_and_reopen_and_a_shared_material_is_copied(tmp_path):
    """The baked image has a user (the material shows it), so it is written packed into the .blend and comes
    back with its pixels; a material another object uses too is copied for the baked object, and the other
    object keeps the original, unchanged. Baking again swaps the image in the same two nodes."""
    _run_blender(textwrap.dedent(_BAKE_SETUP) + textwrap.dedent("""
        cube = new_cube()
        mat = material.apply_tile_texture(cube, path)
        other = new_cube("Other Cube")
        other.data.materials.append(mat)  # the user's second object with the same material
        links_before = links_of(mat)

        image = material.bake_to_uv_image(context, cube, size=64, name="Cube Bake")
        copy = cube.active_material
        assert copy != mat and copy.name == f"{mat.name} Baked" and other.active_material == mat
        assert links_of(mat) == links_before and material.BAKED_TEXTURE_NODE not in mat.node_tree.nodes
        assert copy.node_tree.nodes[material.BAKED_TEXTURE_NODE].image == image
        assert material.materials_showing(cube, image) == [copy.name] and material.materials_showing(other, image) == []
        pixels = np.empty(64 * 64 * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
        assert pixels.reshape(-1, 4)[:, :3].max() > 0.5

        # Baking again (the copy is this object's own now): the same nodes, the new image; no second copy.
        again = material.bake_to_uv_image(context, cube, size=64, name="Cube Bake 2")
        assert cube.active_material == copy and len([m for m in bpy.data.materials if m.name.startswith(mat.name)]) == 2
        assert copy.node_tree.nodes[material.BAKED_TEXTURE_NODE].image == again
        assert [n.name for n in copy.node_tree.nodes].count(material.BAKED_TEXTURE_NODE) == 1
        baked_again = np.empty(64 * 64 * 4, dtype=np.float32)
        again.pixels.foreach_get(baked_again)

        blend = os.path.join(os.getcwd(), "baked.blend")
        bpy.ops.wm.save_as_mainfile(filepath=blend)
        bpy.ops.wm.open_mainfile(filepath=blend)
        reopened = bpy.data.images.get("Cube Bake 2")
        assert reopened is not None and reopened.packed_file is not None and tuple(reopened.size) == (64, 64)
        reread = np.empty(64 * 64 * 4, dtype=np.float32)
        reopened.pixels.foreach_get(reread)
        np.testing.assert_allclose(reread, baked_again, atol=1 / 255)  # the packed 8-bit PNG's pixels
        assert "Cube Bake" not in bpy.data.images  # the first bake, replaced, had no user left
        cube = bpy.data.objects["Test Cube"]
        assert cube.active_material.node_tree.nodes[material.BAKED_TEXTURE_NODE].image == reopened
        assert bpy.data.objects["Other Cube"].active_material.name == "SyncSphere Material"
    """), tmp_path)


def test_bake_refuses_what_it_cannot_bake(tmp_path):
    """Non-mesh objects, meshes without a material and materials without a colour give a readable
    ValueError, and leave no image, no UV map and no changed scene behind."""
    _run_blender("""
        bare = new_cube("Bare")
        no_colour_cube = new_cube("No Colour Cube")
        while no_colour_cube.data.uv_layers:
            no_colour_cube.data.uv_layers.remove(no_colour_cube.data.uv_layers[0])
        mat = bpy.data.materials.new("No Colour")
        if bpy.app.version < (5, 0, 0):
            mat.use_nodes = True
        tree = mat.node_tree
        tree.nodes.remove(tree.nodes["Principled BSDF"])
        mix = tree.nodes.new("ShaderNodeMixShader")  # no Color input, no Principled BSDF upstream
        tree.links.new(mix.outputs["Shader"], tree.nodes["Material Output"].inputs["Surface"])
        no_colour_cube.data.materials.append(mat)
        refusals = [(bpy.data.objects["Camera"], "mesh"), (bare, "no material"),
                    (no_colour_cube, "Cannot find the colour")]
        if bpy.app.version < (5, 0, 0):  # only 4.x materials can be without nodes
            nodeless_cube = new_cube("Nodeless")
            nodeless_cube.data.materials.append(bpy.data.materials.new("Nodeless"))
            refusals.append((nodeless_cube, "does not use nodes"))
        images, engine = len(bpy.data.images), scene.render.engine
        nodes = sorted(n.name for n in tree.nodes)

        for obj, words in refusals:
            try:
                material.bake_to_uv_image(context, obj, size=16)
            except ValueError as error:
                assert words in str(error), str(error)
            else:
                raise AssertionError(f"{obj.name} was baked")
        assert len(bpy.data.images) == images and scene.render.engine == engine
        assert len(no_colour_cube.data.uv_layers) == 0 and sorted(n.name for n in tree.nodes) == nodes
        if bpy.app.version < (5, 0, 0):
            assert not bpy.data.materials["Nodeless"].use_nodes
    """, tmp_path)


# --- panoramas -----------------------------------------------------------------------------------


def test_load_image_in_editor_shows_it_in_image_editors_only(tmp_path):
    """Headless: no Image Editor is no error; an Image Editor shows the image, a UV Editor does not."""
    _run_blender("""
        path = write_checker("wide.png")
        areas = context.window_manager.windows[0].screen.areas
        assert not any(area.type == "IMAGE_EDITOR" for area in areas)
        image = material.load_image_in_editor(path)
        assert image.filepath.endswith("wide.png") and image.size[0] == 128

        areas[0].ui_type = "IMAGE_EDITOR"
        areas[1].ui_type = "UV"
        again = material.load_image_in_editor(path)
        assert again == image and len([i for i in bpy.data.images if i.filepath.endswith("wide.png")]) == 1
        assert areas[0].spaces.active.image == image
        assert areas[1].spaces.active.image is None
    """, tmp_path)
