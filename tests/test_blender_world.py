"""The World applier (blender_addon/scene/world.py) in headless Blender: direction, EXR values, nodes, restore.

Like tests/test_extension.py, everything that imports bpy runs in a fresh interpreter (this one's
executable, which has the ``bpy`` module), loading the add-on the way that file does; the subprocess
prints one ``RESULT <json>`` line and the assertions are made here. No torch is needed.

Renders use Cycles on the CPU with one sample, a near-zero pixel filter and the world's importance map
switched off: a camera ray that hits nothing returns exactly the World's colour in its direction, and
each render takes milliseconds.
"""

import importlib.util
import json
import math

import numpy as np
import pytest

from test_extension import _PRELUDE, _WRITE_EXR, REPO, _bpy_dir, _run_python

pytestmark = pytest.mark.skipif(_bpy_dir() is None, reason="bpy is not installed")

# Runs after _PRELUDE in every subprocess: loads the add-on and defines the helpers the tests share.
_HELPERS = r"""
import json, math
import numpy as np
import bpy
from mathutils import Quaternion, Vector

load_addon()
from syncsphere.blender_addon.scene import world as W

bpy.ops.wm.read_factory_settings(use_empty=True)


def result(value):
    print("RESULT " + json.dumps(value))


""" + _WRITE_EXR + r"""

def image_rgb(image):
    '''An image's pixels as (H, W, 3), top row first.'''
    width, height = image.size
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    return pixels.reshape(height, width, 4)[::-1, :, :3]


def longitude_ramp(width=128):
    '''An equirect image that encodes its own coordinates, with no seam anywhere.

    R, G = 0.5 + 0.5 (cos, sin)(2 pi u) for the column's u = (j + 0.5) / W, so u is read back with
    atan2 wherever the image is sampled; B = the row's height, 1 at the top row, 0 at the bottom.
    '''
    height = width // 2
    u = (np.arange(width) + 0.5) / width
    rgb = np.empty((height, width, 3), np.float32)
    rgb[..., 0] = 0.5 + 0.5 * np.cos(2 * np.pi * u)[None, :]
    rgb[..., 1] = 0.5 + 0.5 * np.sin(2 * np.pi * u)[None, :]
    rgb[..., 2] = (1.0 - (np.arange(height) + 0.5) / height)[:, None]
    return rgb


def decode(rgb):
    '''(u, height) of the ramp at one pixel.'''
    u = math.atan2(rgb[1] - 0.5, rgb[0] - 0.5) / (2 * math.pi) % 1.0
    return float(u), float(rgb[2])


def setup_cycles(size=5, fov_degrees=10.0):
    '''Cycles, CPU, one sample, pixel = one direction; returns a camera at the origin.'''
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 1
    scene.cycles.use_denoising = False
    scene.cycles.filter_width = 0.01
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    settings = scene.render.image_settings
    settings.file_format, settings.color_depth, settings.color_mode = "OPEN_EXR", "32", "RGB"
    data = bpy.data.cameras.new("test-camera")
    data.angle = math.radians(fov_degrees)
    camera = bpy.data.objects.new("test-camera", data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return camera


def fast(world):
    '''No importance map for this World: building it dominates a tiny render.'''
    world.cycles.sampling_method = "NONE"
    return world


def aim(camera, azimuth, pitch=0.0, roll=0.0):
    '''Point the camera (local -Z) at world azimuth atan2(y, x) and pitch, rolled about its view axis.'''
    # Level first (local +Y up), then tilt about the camera's own X axis (positive looks up) and
    # roll about its view axis: well defined even when looking straight up or down.
    level = Vector((math.cos(azimuth), math.sin(azimuth), 0.0)).to_track_quat("-Z", "Y")
    camera.rotation_mode = "QUATERNION"
    camera.rotation_quaternion = level @ Quaternion((1, 0, 0), pitch) @ Quaternion((0, 0, 1), roll)
    bpy.context.view_layer.update()


def render(path):
    '''Render the scene to an EXR and return its pixels (H, W, 3), top row first.'''
    bpy.context.scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(path, check_existing=False)
    rgb = image_rgb(image)
    bpy.data.images.remove(image)
    return rgb


def centre(rgb):
    return rgb[rgb.shape[0] // 2, rgb.shape[1] // 2]
"""


def _blender(code, tmp_path):
    """Run ``code`` after the shared helpers in a fresh bpy interpreter; return what it passed to result()."""
    done = _run_python(_PRELUDE + _HELPERS + f"TMP = {str(tmp_path)!r}\n" + code)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def _angle_difference(a, b):
    """a - b wrapped to [-pi, pi)."""
    return (a - b + math.pi) % (2 * math.pi) - math.pi


# --- which way the image faces --------------------------------------------------------------------


def test_image_centre_faces_plus_x_and_u_increases_clockwise(tmp_path):
    """Establish by rendering where each part of the equirect image appears (documented in docs/blender.md).

    A camera is pointed along each world axis and up/down; its centre pixel reads back which (u,
    height) of the image it sees. Then a Mapping rotation shows which way the rotation turns the image.
    """
    seen = _blender("""
camera = setup_cycles()
write_exr(TMP + "/ramp.exr", longitude_ramp())
world = fast(W.apply_world(bpy.context, TMP + "/ramp.exr"))
views = {"+X": (0, 0), "+Y": (90, 0), "-X": (180, 0), "-Y": (-90, 0), "+X up 30": (0, 30),
         "+X down 45": (0, -45)}
seen = {}
for name, (azimuth, pitch) in views.items():
    aim(camera, math.radians(azimuth), math.radians(pitch))
    seen[name] = decode(centre(render(TMP + "/view.exr")))
W.set_world_rotation(world, math.radians(30))
aim(camera, 0.0)
seen["+X, rotation +30"] = decode(centre(render(TMP + "/view.exr")))
aim(camera, math.radians(-30))
seen["azimuth -30, rotation +30"] = decode(centre(render(TMP + "/view.exr")))
result(seen)
""", tmp_path)

    def assert_sees(name, u, height):
        got_u, got_height = seen[name]
        # Renders read back to about 1e-7; 0.002 of a turn (0.7°) is a quarter of a pixel here.
        assert abs(_angle_difference(2 * math.pi * got_u, 2 * math.pi * u)) < 0.002 * 2 * math.pi, (name, seen)
        assert abs(got_height - height) < 0.002, (name, seen)

    # Rotation 0: the image centre (u = 0.5) is along +X on the horizon ...
    assert_sees("+X", 0.5, 0.5)
    # ... and u grows clockwise seen from above: +X (0.5) -> -Y (0.75) -> -X (0 = 1) -> +Y (0.25).
    assert_sees("-Y", 0.75, 0.5)
    assert_sees("-X", 0.0, 0.5)
    assert_sees("+Y", 0.25, 0.5)
    # The file's top row looks up: height (1 at the top row) = 0.5 + pitch / 180°.
    assert_sees("+X up 30", 0.5, 0.5 + 30 / 180)
    assert_sees("+X down 45", 0.5, 0.5 - 45 / 180)
    # Mapping Z rotation r rotates the lookup direction by +r: +X now shows what azimuth +30° showed
    # (u = 0.5 - 30/360), and the image centre has moved to azimuth -30° (clockwise seen from above).
    assert_sees("+X, rotation +30", 0.5 - 30 / 360, 0.5)
    assert_sees("azimuth -30, rotation +30", 0.5, 0.5)


def test_face_camera_rotation_puts_the_image_centre_in_the_middle_of_the_frame(tmp_path):
    """For cameras turned, pitched, rolled, moved and parented, the frame's centre sees the image centre."""
    seen = _blender("""
camera = setup_cycles()
camera.location = (4.0, -2.0, 1.5)  # the World has no position; location must not matter
write_exr(TMP + "/ramp.exr", longitude_ramp())
world = fast(W.apply_world(bpy.context, TMP + "/ramp.exr"))
seen = {}
for azimuth, pitch, roll in [(30, 0, 0), (-120, 20, 15), (200, -35, -40), (95, 60, 180)]:
    aim(camera, math.radians(azimuth), math.radians(pitch), math.radians(roll))
    rotation = W.face_camera_rotation(camera)
    assert W.set_world_rotation(world, rotation)
    seen[f"{azimuth} {pitch} {roll}"] = [rotation, *decode(centre(render(TMP + "/view.exr")))]

# A parent turns the camera: matrix_world counts, not the camera's own rotation.
parent = bpy.data.objects.new("rig", None)
bpy.context.scene.collection.objects.link(parent)
aim(camera, math.radians(10))
camera.parent = parent
parent.rotation_euler = (0.0, 0.0, math.radians(50))
parent.scale = (2.0, 2.0, 2.0)  # a scaled rig: the direction must still be read correctly
bpy.context.view_layer.update()
rotation = W.face_camera_rotation(camera)
W.set_world_rotation(world, rotation)
seen["parented 60"] = [rotation, *decode(centre(render(TMP + "/view.exr")))]
result(seen)
""", tmp_path)
    for name, (rotation, u, height) in seen.items():
        azimuth, pitch = (60, 0) if name.startswith("parented") else map(float, name.split()[:2])
        assert -math.pi <= rotation <= math.pi, (name, rotation)
        assert abs(_angle_difference(rotation, -math.radians(azimuth))) < 1e-4, (name, rotation)
        # The frame's centre sees u = 0.5, at the height of the camera's pitch.
        assert abs(_angle_difference(2 * math.pi * u, math.pi)) < 0.002 * 2 * math.pi, (name, seen)
        assert abs(height - (0.5 + pitch / 180)) < 0.002, (name, seen)


def test_face_camera_rotation_for_a_camera_looking_straight_up_or_down(tmp_path):
    """Looking along Z, the heading is where the frame's top (down) or bottom (up) points."""
    seen = _blender("""
camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
bpy.context.scene.collection.objects.link(camera)
seen = {}
for name, pitch in [("down", -90), ("almost down", -89), ("up", 90), ("almost up", 89)]:
    aim(camera, math.radians(70), math.radians(pitch))
    seen[name] = W.face_camera_rotation(camera)
# Exactly vertical, built without to_track_quat: looking down (-Z) with the frame's top towards +Y.
camera.rotation_mode = "XYZ"
camera.rotation_euler = (0.0, 0.0, 0.0)
bpy.context.view_layer.update()
seen["down, top to +Y"] = W.face_camera_rotation(camera)
result(seen)
""", tmp_path)
    for name in ("down", "almost down", "up", "almost up"):
        assert abs(_angle_difference(seen[name], math.radians(-70))) < 1e-4, seen
    assert abs(_angle_difference(seen["down, top to +Y"], -math.pi / 2)) < 1e-6, seen


# --- the EXR's values -----------------------------------------------------------------------------


def _backend_write_exr():
    """The backend's own EXR writer (backend/products/images.py, loaded by path), or None without OpenEXR/PIL."""
    try:
        module = importlib.import_module("backend.products.images")
    except ImportError:
        return None
    return module.write_exr


def test_exr_values_reach_the_world_unchanged(tmp_path):
    """The loaded image holds the file's linear values, above 1 included, rows in the right order.

    The file is written by the backend's writer when OpenEXR is installed here (the Blender 5.0 test
    environment), otherwise by Blender. Separately, an EXR written by Blender reads back 5.0 as 5.0,
    and (with OpenEXR) the file itself holds 5.0: nothing is sRGB-encoded on the way.
    """
    rng = np.random.default_rng(7)
    rgb = rng.uniform(0.0, 8.0, size=(8, 16, 3)).astype(np.float32)
    rgb[0, 0] = 5.0
    rgb[-1, -1] = 0.001
    rgb[2, 3] = [0.5, 1.0, 20.0]
    np.save(tmp_path / "values.npy", rgb)
    backend_write_exr = _backend_write_exr()
    if backend_write_exr is not None:
        backend_write_exr(str(tmp_path / "values.exr"), rgb)
    seen = _blender(f"""
rgb = np.load(TMP + "/values.npy")
if {backend_write_exr is None}:
    write_exr(TMP + "/values.exr", rgb)
write_exr(TMP + "/five.exr", np.full((4, 8, 3), 5.0, np.float32))
five = bpy.data.images.load(TMP + "/five.exr")
five_values = image_rgb(five)
# The same file already loaded and marked sRGB (by a user, or by 5.0 reading a colorInteropID):
# apply_world reuses that image and must make it linear again.
stale = bpy.data.images.load(TMP + "/values.exr")
stale.colorspace_settings.name = "sRGB"
stale_error = float(np.abs(image_rgb(stale) - rgb).max())
world = W.apply_world(bpy.context, TMP + "/values.exr")
image = world.node_tree.nodes[W.ENVIRONMENT_NODE].image
loaded = image_rgb(image)
result({{"five": [float(five_values.min()), float(five_values.max())],
        "max_error": float(np.abs(loaded - rgb).max()),
        "max_relative_error": float((np.abs(loaded - rgb) / rgb).max()),
        "is_float": image.is_float, "colorspace": image.colorspace_settings.name,
        "reused": image == stale, "stale_error": stale_error,
        "filepath": bpy.path.abspath(image.filepath)}})
""", tmp_path)
    assert seen["five"] == pytest.approx([5.0, 5.0], abs=1e-6), seen
    assert seen["is_float"] and seen["colorspace"] in ("Linear Rec.709", "Linear"), seen
    assert seen["max_relative_error"] < 1e-6, seen  # float32 in, float32 out
    assert seen["reused"] and seen["stale_error"] > 0.1, seen  # marked sRGB, the values were wrong
    assert seen["filepath"] == str(tmp_path / "values.exr")

    try:
        import OpenEXR
    except ImportError:
        return
    with OpenEXR.File(str(tmp_path / "five.exr")) as exr:
        stored = np.asarray(exr.channels()["RGB"].pixels, dtype=np.float32)
    np.testing.assert_allclose(stored, 5.0, atol=1e-6)


# --- the node tree, and the user's World --------------------------------------------------------------


_SNAPSHOT = """
def snapshot(world):
    '''Everything a user would notice in a World's node tree.'''
    tree = world.node_tree
    return {"name": world.name,
            "nodes": sorted([node.name, node.bl_idname] for node in tree.nodes),
            "links": sorted([l.from_node.name, l.from_socket.identifier, l.to_node.name,
                             l.to_socket.identifier] for l in tree.links),
            "rgb": list(tree.nodes["My Colour"].outputs[0].default_value),
            "strength": tree.nodes["Background"].inputs["Strength"].default_value}


def user_world():
    world = bpy.data.worlds.new("My World")
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    tree = world.node_tree
    colour = tree.nodes.new("ShaderNodeRGB")
    colour.name = "My Colour"
    colour.outputs[0].default_value = (0.2, 0.4, 0.6, 1.0)
    tree.links.new(colour.outputs[0], tree.nodes["Background"].inputs["Color"])
    tree.nodes["Background"].inputs["Strength"].default_value = 0.7
    bpy.context.scene.world = world
    return world
"""


def _links(hide):
    """The links apply_world must make, as (from node, from socket, to node, to socket) identifiers."""
    links = [
        ["SyncSphere Texture Coordinate", "Generated", "SyncSphere Mapping", "Vector"],
        ["SyncSphere Mapping", "Vector", "SyncSphere Environment", "Vector"],
        ["SyncSphere Environment", "Color", "SyncSphere Background", "Color"],
    ]
    if not hide:
        return sorted(links + [["SyncSphere Background", "Background", "SyncSphere World Output", "Surface"]])
    return sorted(links + [
        ["SyncSphere Light Path", "Is Camera Ray", "SyncSphere Camera Mix", "Fac"],
        ["SyncSphere Background", "Background", "SyncSphere Camera Mix", "Shader"],
        ["SyncSphere Camera Background", "Background", "SyncSphere Camera Mix", "Shader_001"],
        ["SyncSphere Camera Mix", "Shader", "SyncSphere World Output", "Surface"],
    ])


def test_node_tree_previous_world_and_restore(tmp_path):
    """Exactly the expected nodes and links; the user's World is untouched, remembered and restorable.

    Applying twice makes two Worlds (the first keeps its nodes) that both remember the user's World;
    the memory survives save and reload, and restoring brings back the user's World unchanged.
    """
    seen = _blender(_SNAPSHOT + """
write_exr(TMP + "/a.exr", np.full((4, 8, 3), 0.5, np.float32))
mine = user_world()
before = snapshot(mine)
seen = {"before": before}

first = W.apply_world(bpy.context, TMP + "/a.exr", rotation=0.25, strength=2.5)
nodes = first.node_tree.nodes
seen["first"] = {
    "links": sorted([l.from_node.name, l.from_socket.identifier, l.to_node.name, l.to_socket.identifier]
                    for l in first.node_tree.links),
    "node_count": len(nodes),
    "texcoord_out": [s.identifier for s in nodes[W.TEXCOORD_NODE].outputs if s.is_linked],
    "rotation": list(nodes[W.MAPPING_NODE].inputs["Rotation"].default_value),
    "vector_type": nodes[W.MAPPING_NODE].vector_type,
    "projection": nodes[W.ENVIRONMENT_NODE].projection,
    "image": bpy.path.abspath(nodes[W.ENVIRONMENT_NODE].image.filepath),
    "strength": nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value,
    "scene_world": bpy.context.scene.world.name,
    "is_syncsphere": [W.is_syncsphere_world(first), W.is_syncsphere_world(mine)],
    "previous": first[W.PREVIOUS_PROP].name,
}
assert W.set_world_rotation(first, -1.5) and W.set_world_strength(first, 0.25)
seen["updated"] = [nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2],
                   nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value]
seen["set_on_user_world"] = [W.set_world_rotation(mine, 1.0), W.set_world_strength(mine, 1.0)]
first_links = seen["first"]["links"]

second = W.apply_world(bpy.context, TMP + "/a.exr", hide_from_camera=True, name="Second")
seen["second"] = {
    "links": sorted([l.from_node.name, l.from_socket.identifier, l.to_node.name, l.to_socket.identifier]
                    for l in second.node_tree.links),
    "node_count": len(second.node_tree.nodes),
    "camera_colour": list(second.node_tree.nodes[W.CAMERA_BACKGROUND_NODE].inputs["Color"].default_value),
    "distinct": second != first,
    "previous": second[W.PREVIOUS_PROP].name,
    "first_links_kept": sorted([l.from_node.name, l.from_socket.identifier, l.to_node.name,
                                l.to_socket.identifier] for l in first.node_tree.links) == first_links,
    "same_image": second.node_tree.nodes[W.ENVIRONMENT_NODE].image == nodes[W.ENVIRONMENT_NODE].image,
}
W.set_world_strength(second, 3.0)
seen["second"]["camera_strength"] = second.node_tree.nodes[W.CAMERA_BACKGROUND_NODE].inputs["Strength"].default_value
seen["after_apply"] = snapshot(mine)
seen["user_world_users"] = mine.users  # nothing uses it but SyncSphere's memory of it

bpy.ops.wm.save_as_mainfile(filepath=TMP + "/scene.blend")
bpy.ops.wm.open_mainfile(filepath=TMP + "/scene.blend")
seen["reloaded_world"] = bpy.context.scene.world.name
seen["restored"] = W.restore_previous_world(bpy.context)
seen["after_restore"] = snapshot(bpy.context.scene.world)
seen["restore_again"] = W.restore_previous_world(bpy.context)  # the user's World remembers nothing

# A deleted previous World cannot be restored; the scene keeps its World.
third = W.apply_world(bpy.context, TMP + "/a.exr")
bpy.data.worlds.remove(bpy.data.worlds["My World"])
seen["deleted"] = [W.restore_previous_world(bpy.context), bpy.context.scene.world == third]

# A scene that had no World: nothing to restore.
bpy.context.scene.world = None
W.apply_world(bpy.context, TMP + "/a.exr")
seen["no_previous"] = [W.restore_previous_world(bpy.context), bpy.context.scene.world is not None]

count = len(bpy.data.worlds)
try:
    W.apply_world(bpy.context, TMP + "/missing.exr")
except FileNotFoundError as exc:
    seen["missing"] = [str(exc), len(bpy.data.worlds) == count]
result(seen)
""", tmp_path)
    first, second = seen["first"], seen["second"]
    assert first["links"] == _links(hide=False)
    assert first["node_count"] == 5
    assert first["texcoord_out"] == ["Generated"]
    assert first["rotation"] == pytest.approx([0.0, 0.0, 0.25])
    assert (first["vector_type"], first["projection"]) == ("POINT", "EQUIRECTANGULAR")
    assert first["image"] == str(tmp_path / "a.exr")
    assert first["strength"] == pytest.approx(2.5)
    assert first["scene_world"] == "SyncSphere World"
    assert first["is_syncsphere"] == [True, False]
    assert first["previous"] == "My World"
    assert seen["updated"] == pytest.approx([-1.5, 0.25])
    assert seen["set_on_user_world"] == [False, False]

    assert second["links"] == _links(hide=True)
    assert second["node_count"] == 8
    assert second["camera_colour"] == [0.0, 0.0, 0.0, 1.0]
    assert second["distinct"] and second["first_links_kept"] and second["same_image"]
    assert second["previous"] == "My World"  # not the first SyncSphere world: restore goes home
    assert second["camera_strength"] == 1.0  # the strength setter leaves the camera's colour alone

    assert seen["after_apply"] == seen["before"]
    assert seen["user_world_users"] >= 1
    assert seen["reloaded_world"] == "Second"
    assert seen["restored"] is True
    assert seen["after_restore"] == seen["before"]
    assert seen["restore_again"] is False
    assert seen["deleted"] == [False, True]
    assert seen["no_previous"] == [False, True]
    assert "does not exist" in seen["missing"][0] and seen["missing"][1]


def test_hide_from_camera_shows_black_but_still_lights_the_scene(tmp_path):
    """With hide_from_camera the background renders black while a diffuse plane is lit by the image."""
    seen = _blender("""
camera = setup_cycles(size=16, fov_degrees=40)
bpy.context.scene.cycles.samples = 4
aim(camera, 0.0)
mesh = bpy.data.meshes.new("plane")
# A quad facing the camera at x = 3, covering the middle of the frame; no material: 0.8 grey diffuse.
mesh.from_pydata([(3, -0.5, -0.5), (3, 0.5, -0.5), (3, 0.5, 0.5), (3, -0.5, 0.5)], [], [(0, 1, 2, 3)])
plane = bpy.data.objects.new("plane", mesh)
bpy.context.scene.collection.objects.link(plane)
write_exr(TMP + "/grey.exr", np.full((8, 16, 3), 2.0, np.float32))

def measure():
    rgb = render(TMP + "/view.exr")
    return {"corners": float(np.abs(rgb[[0, 0, -1, -1], [0, -1, 0, -1]]).max()),
            "plane": float(rgb[6:10, 6:10].mean())}

seen = {}
fast(W.apply_world(bpy.context, TMP + "/grey.exr"))
seen["shown"] = measure()
hidden = fast(W.apply_world(bpy.context, TMP + "/grey.exr", hide_from_camera=True))
seen["hidden"] = measure()
W.set_world_strength(hidden, 0.5)
seen["hidden, strength 0.5"] = measure()
result(seen)
""", tmp_path)
    # A uniform environment of 2.0 seen directly, and lighting a 0.8 albedo diffuse plane: 1.6.
    assert seen["shown"]["corners"] == pytest.approx(2.0, abs=1e-3), seen
    assert seen["shown"]["plane"] == pytest.approx(1.6, rel=0.05), seen
    assert seen["hidden"]["corners"] < 1e-6, seen
    assert seen["hidden"]["plane"] == pytest.approx(1.6, rel=0.05), seen
    assert seen["hidden, strength 0.5"]["corners"] < 1e-6, seen
    assert seen["hidden, strength 0.5"]["plane"] == pytest.approx(0.8, rel=0.05), seen
