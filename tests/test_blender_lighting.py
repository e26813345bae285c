"""A HDR World's lighting in headless Blender (issue #8): the Sun lamp, its World nodes, and a render that
proves the shadows.

Like tests/test_blender_world.py, everything that imports bpy runs in a fresh interpreter that prints one
``RESULT <json>`` line; the assertions are made here. That interpreter is SYNCSPHERE_TEST_BLENDER_PYTHON
when set (the Blender 4.2 environment; as tests/test_blender_generate.py), else this one.

The render: a synthetic HDR World built here (a uniform sky of 0.5 and a sun disc of 3° radius at yaw 30°,
pitch 40°, whose direct irradiance on a plane facing it is 6 times what the rest of the sphere gives), a
white plane with a unit cube on it, and a camera looking straight down. The plane's brightness is measured in
three patches found from the geometry (projected to pixels with ``world_to_camera_view``): where the
cube's shadow falls (opposite the sun's world direction), its mirror image through the cube (towards the
sun, as far from the cube, so the cube hides as much sky there), and the open plane away from both.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_blender_world import _backend_write_exr
from test_extension import _ENABLE_ADDON, _PRELUDE, _WRITE_EXR, REPO, _bpy_dir

BLENDER_PYTHON = os.path.abspath(os.environ.get("SYNCSPHERE_TEST_BLENDER_PYTHON", sys.executable))
pytestmark = pytest.mark.skipif(BLENDER_PYTHON == os.path.abspath(sys.executable) and _bpy_dir() is None,
                                reason="bpy is not installed")

# Runs after _PRELUDE: registers and enables the add-on (scene.syncsphere, the operators) and defines helpers.
_HELPERS = r"""
import json, math, os
import numpy as np
import bpy
from mathutils import Vector
from bpy_extras.object_utils import world_to_camera_view

""" + _ENABLE_ADDON + r"""from syncsphere.blender_addon.core import lighting as L
from syncsphere.blender_addon.scene import results, world as W

context = bpy.context
scene = context.scene
settings = scene.syncsphere
for obj in list(bpy.data.objects):  # the startup file's cube, light and camera
    bpy.data.objects.remove(obj)
for data in (bpy.data.meshes, bpy.data.lights, bpy.data.cameras):
    for block in list(data):
        data.remove(block)


def result(value):
    print("RESULT " + json.dumps(value))


def finish():
    '''Disable and unregister the add-on, as Blender does, so the interpreter exits cleanly.'''
    bpy.context.preferences.addons.remove(entry)
    addon.unregister()


""" + _WRITE_EXR + r"""

def write_pending_exrs():
    '''The EXRs the test could not write with the backend's writer (TMP/pending.npz: name -> array).'''
    pending = os.path.join(TMP, "pending.npz")
    if os.path.exists(pending):
        for name, rgb in np.load(pending).items():
            write_exr(os.path.join(TMP, name.replace("__", "/") + ".exr"), rgb)


def snapshot(obj):
    '''What a user would notice of a light object.'''
    return {"name": obj.name, "type": obj.data.type, "energy": obj.data.energy, "angle": getattr(obj.data, "angle", None),
            "colour": list(obj.data.color), "rotation": list(obj.rotation_euler), "location": list(obj.location),
            "keys": sorted(obj.keys()), "animated": obj.animation_data is not None,
            "in scene": scene.objects.get(obj.name) == obj}


def sync_lamps():
    '''The lights SyncSphere would call its own (at most one) and every light object's name.'''
    return {"ours": W.sun_lamp(scene).name if W.sun_lamp(scene) else None,
            "lights": sorted(obj.name for obj in bpy.data.objects if obj.type == "LIGHT")}
"""


def _blender(code, tmp_path, timeout=300):
    """Run ``code`` after the helpers in a fresh bpy interpreter; return what it passed to result()."""
    script = _PRELUDE + _HELPERS + f"TMP = {str(tmp_path)!r}\nwrite_pending_exrs()\n" + textwrap.dedent(code) + "\nfinish()\n"
    done = subprocess.run([BLENDER_PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _write_exrs(tmp_path, images):
    """Write {relative path without .exr: (H, W, 3) array} as EXRs: with the backend's writer here when it
    can, else left in pending.npz for the Blender script (write_pending_exrs)."""
    write = _backend_write_exr()
    for name in images:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    if write is None:
        np.savez(tmp_path / "pending.npz", **{name.replace("/", "__"): rgb for name, rgb in images.items()})
        return
    for name, rgb in images.items():
        write(str(tmp_path / f"{name}.exr"), rgb)


# --- the synthetic HDR World -----------------------------------------------------------------------------

SUN_YAW, SUN_PITCH, SUN_RADIUS = 30.0, 40.0, 3.0  # degrees
SKY = 0.5
SUN_RATIO = 6.0
PANORAMA_WIDTH = 512


def _equirect_angles(width):
    """(lon, lat) in radians of every pixel centre (docs/conventions.md#directions, backend/sphere/geometry.py):
    lon = yaw."""
    height = width // 2
    lon = (np.arange(width) + 0.5) / width * 2 * np.pi - np.pi
    lat = np.pi / 2 - (np.arange(height) + 0.5) / height * np.pi
    return np.meshgrid(lon, lat)


def synthetic_world(width=PANORAMA_WIDTH):
    """(hdr, sky, ldr, lighting dict): the sky of SKY with a sun disc at (SUN_YAW, SUN_PITCH) of SUN_RADIUS.

    The disc's radiance makes the sun's direct irradiance on a plane facing it SUN_RATIO times the diffuse
    irradiance the rest of the sphere gives that plane, both integrated over the pixels as Blender sees
    them (each pixel a patch of solid angle (2 pi / W)(pi / H) cos(lat)). ``sky``: the disc at sky level;
    ``ldr``: the disc clipped to 1, as an 8-bit image would have it.
    """
    lon, lat = _equirect_angles(width)
    height = width // 2
    yaw, pitch = math.radians(SUN_YAW), math.radians(SUN_PITCH)
    cos_to_sun = np.sin(lat) * math.sin(pitch) + np.cos(lat) * math.cos(pitch) * np.cos(lon - yaw)
    solid_angle = (2 * np.pi / width) * (np.pi / height) * np.cos(lat)
    disc = cos_to_sun >= math.cos(math.radians(SUN_RADIUS))
    facing = np.clip(cos_to_sun, 0.0, None) * solid_angle
    diffuse = float(SKY * facing[~disc].sum())
    radiance = SUN_RATIO * diffuse / float(facing[disc].sum())
    sky = np.full((height, width, 3), SKY, np.float32)
    hdr = sky.copy()
    hdr[disc] = radiance
    ldr = sky.copy()
    ldr[disc] = 1.0
    lighting = {"version": 1, "exposure_ev": 0.0, "sun_ratio": SUN_RATIO, "diffuse_irradiance": diffuse,
                "sources": [{"yaw_deg": SUN_YAW, "pitch_deg": SUN_PITCH, "angular_radius_deg": SUN_RADIUS,
                             "color": [1.0, 1.0, 1.0], "radiance": radiance,
                             "irradiance": SUN_RATIO * diffuse, "irradiance_ratio": SUN_RATIO,
                             "is_sun": True, "placed": False}]}
    return hdr, sky, ldr, lighting


def _write_jobs(tmp_path):
    """hdr/ (panorama.exr, panorama_sky.exr, lighting.json, as a HDR job writes them) and ldr/ (panorama.exr
    alone, as a --no-hdr job). Returns the lighting dict."""
    hdr, sky, ldr, lighting = synthetic_world()
    _write_exrs(tmp_path, {"hdr/panorama": hdr, "hdr/panorama_sky": sky, "ldr/panorama": ldr})
    (tmp_path / "hdr" / "lighting.json").write_text(json.dumps(lighting), encoding="utf-8")
    return lighting


# --- the scene's geometry, here in plain Python -------------------------------------------------------

CUBE = ((-0.5, -0.5, 0.0), (0.5, 0.5, 1.0))  # a unit cube standing on the plane z = 0 at the origin
CAMERA = (0.0, 0.0, 6.0)  # looking straight down; 45° field of view: the plane within about ±2.4
PATCH = [(dx, dy) for dx in (-0.1, 0.0, 0.1) for dy in (-0.1, 0.0, 0.1)]  # 9 points, 0.14 at most off centre
PATCH_DISTANCE = 1.0  # of a patch's centre from the cube's centre, along the sun's horizontal direction


def sun_world_direction(rotation):
    """The sun's world direction under Mapping rotation ``rotation`` (radians), from world.py's convention
    as tests/test_blender_world.py measured it: azimuth atan2(y, x) = -yaw - rotation, elevation = pitch."""
    azimuth, pitch = -math.radians(SUN_YAW) - rotation, math.radians(SUN_PITCH)
    return np.array([math.cos(pitch) * math.cos(azimuth), math.cos(pitch) * math.sin(azimuth), math.sin(pitch)])


def _hits_cube(origin, direction, t_max=np.inf):
    """Whether the ray origin + t direction, 0 < t < t_max, passes through the cube (slab test)."""
    low, high = np.array(CUBE[0]), np.array(CUBE[1])
    t_near, t_far = 1e-6, t_max
    for axis in range(3):
        if abs(direction[axis]) < 1e-12:
            if not low[axis] <= origin[axis] <= high[axis]:
                return False
            continue
        t1, t2 = sorted(((low[axis] - origin[axis]) / direction[axis], (high[axis] - origin[axis]) / direction[axis]))
        t_near, t_far = max(t_near, t1), min(t_far, t2)
    return t_near < t_far


def _sun_disc_directions(rotation):
    """The sun's centre and four points on its rim, as world directions."""
    directions = []
    for d_yaw, d_pitch in ((0, 0), (SUN_RADIUS, 0), (-SUN_RADIUS, 0), (0, SUN_RADIUS), (0, -SUN_RADIUS)):
        azimuth = -math.radians(SUN_YAW + d_yaw / math.cos(math.radians(SUN_PITCH))) - rotation
        pitch = math.radians(SUN_PITCH + d_pitch)
        directions.append(np.array([math.cos(pitch) * math.cos(azimuth), math.cos(pitch) * math.sin(azimuth),
                                    math.sin(pitch)]))
    return directions


def patches(rotation):
    """{"shadow", "mirror", "open"}: lists of plane points (x, y, 0), for the sun under ``rotation``.

    shadow: PATCH_DISTANCE from the cube's centre opposite the sun's horizontal direction; mirror: as far
    towards the sun; open: twice as far, at right angles to it. Checked here: every shadow point has the
    whole sun disc hidden by the cube (umbra), no mirror or open point has any of it hidden, and the camera
    sees every point.
    """
    towards = sun_world_direction(rotation)
    horizontal = towards[:2] / np.linalg.norm(towards[:2])
    side = np.array([-horizontal[1], horizontal[0]])
    centres = {"shadow": -PATCH_DISTANCE * horizontal, "mirror": PATCH_DISTANCE * horizontal,
               "open": 2 * PATCH_DISTANCE * side}
    found = {name: [(float(centre[0] + dx), float(centre[1] + dy), 0.0) for dx, dy in PATCH]
             for name, centre in centres.items()}
    disc = _sun_disc_directions(rotation)
    for name, points in found.items():
        for point in points:
            point = np.array(point)
            hidden = [_hits_cube(point, direction) for direction in disc]
            assert all(hidden) if name == "shadow" else not any(hidden), (name, point, hidden)
            to_camera = np.array(CAMERA) - point
            assert not _hits_cube(point, to_camera, 1.0), (name, point)
    return found


# The Blender side of the render test: the scene, and the mean of each patch's pixels.
_SCENE = r"""
def diffuse_material(name, albedo=0.8):
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    bsdf = tree.nodes.new("ShaderNodeBsdfDiffuse")
    bsdf.inputs["Color"].default_value = (albedo, albedo, albedo, 1.0)
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    tree.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    return material


def mesh_object(name, vertices, faces):
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(vertices, [], faces)
    mesh.materials.append(white)
    obj = bpy.data.objects.new(name, mesh)
    scene.collection.objects.link(obj)
    return obj


def render(path):
    '''Render to an EXR; its pixels (H, W, 3), top row first.'''
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(path, check_existing=False)
    width, height = image.size
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    bpy.data.images.remove(image)
    return pixels.reshape(height, width, 4)[::-1, :, :3]


def measure(name):
    '''Render, and the mean brightness (mean of R, G, B) of each patch's pixels.'''
    rgb = render(os.path.join(TMP, name + ".exr"))
    height, width, _ = rgb.shape
    means = {}
    for patch, points in PATCHES.items():
        values = []
        for point in points:
            u, v, depth = world_to_camera_view(scene, camera, Vector(point))
            assert 0 <= u <= 1 and 0 <= v <= 1 and depth > 0, (patch, point)
            column, row = min(int(u * width), width - 1), min(int((1 - v) * height), height - 1)
            values.append(float(rgb[row, column].mean()))
        means[patch] = float(np.mean(values))
    return means


white = diffuse_material("white")
mesh_object("plane", [(-4, -4, 0), (4, -4, 0), (4, 4, 0), (-4, 4, 0)], [(0, 1, 2, 3)])
(x0, y0, z0), (x1, y1, z1) = CUBE
mesh_object("cube", [(x, y, z) for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)],
            [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
camera_data = bpy.data.cameras.new("camera")
camera_data.angle = math.radians(45.0)
camera = bpy.data.objects.new("camera", camera_data)
camera.location = CAMERA  # rotation 0: looking down -Z
scene.collection.objects.link(camera)
scene.camera = camera
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = SAMPLES
scene.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = SIZE
scene.render.resolution_percentage = 100
image_settings = scene.render.image_settings
image_settings.file_format, image_settings.color_depth, image_settings.color_mode = "OPEN_EXR", "32", "RGB"
bpy.context.view_layer.update()
"""

SAMPLES, SIZE = 16, 64


def test_the_render_proves_the_shadows_in_both_sun_modes_and_not_without_hdr(tmp_path):
    """Cycles on the CPU, 16 samples, 64x64 px. With HDR the lit plane is at least 3 times as bright as the
    cube's shadow, which falls opposite the sun, with the sun as a lamp and in the texture alike (and when
    the World is turned: by the panel's socket, which the lamp follows through its driver, or by
    set_world_rotation); without HDR (the disc clipped to 1, no lighting.json) it is below 1.5.

    The lamp's strength is the sun's irradiance: the open plane is as bright with the lamp as with the
    disc in the texture, and as bright as albedo / pi times the irradiance the two give it.
    """
    lighting = _write_jobs(tmp_path)
    turned = math.radians(90.0)
    found = {"straight": patches(0.0), "turned": patches(turned)}
    measured = _blender(f"""
CUBE, CAMERA, SAMPLES, SIZE = {CUBE!r}, {CAMERA!r}, {SAMPLES}, {SIZE}
FOUND = {found!r}
PATCHES = FOUND["straight"]
""" + _SCENE + f"""
hdr = {{"png": "", "exr": os.path.join(TMP, "hdr", "panorama.exr")}}
measured, lamps = {{}}, {{}}
settings.mode, settings.hdr, settings.sun_mode = "WORLD", True, "SUN_LAMP"
results.apply_result(context, settings, "WORLD", hdr)
lamp = W.sun_lamp(scene)
lamps["applied"] = [lamp.data.energy, lamp.data.angle, list(lamp.rotation_euler)]
measured["sun lamp"] = measure("sun-lamp")
# The panel turns the World through the Mapping socket itself: the lamp's driver turns the lamp.
scene.world.node_tree.nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2] = {turned!r}
PATCHES = FOUND["turned"]
measured["sun lamp, turned"] = measure("sun-lamp-turned")
lamps["turned"] = list(lamp.rotation_euler)

settings.sun_mode = "IN_TEXTURE"
PATCHES = FOUND["straight"]
results.apply_result(context, settings, "WORLD", hdr)
lamps["in texture"] = W.sun_lamp(scene) is None
measured["in texture"] = measure("in-texture")
W.set_world_rotation(scene.world, {turned!r})
PATCHES = FOUND["turned"]
measured["in texture, turned"] = measure("in-texture-turned")

settings.hdr = False
PATCHES = FOUND["straight"]
results.apply_result(context, settings, "WORLD", {{"png": "", "exr": os.path.join(TMP, "ldr", "panorama.exr")}})
measured["no hdr"] = measure("no-hdr")
result({{"measured": measured, "lamps": lamps}})
""", tmp_path)
    lamps, measured = measured["lamps"], measured["measured"]
    ratios = {case: values["mirror"] / values["shadow"] for case, values in measured.items()}
    print("lit/shadow:", {case: round(ratio, 2) for case, ratio in ratios.items()}, "patch means:", measured)

    sun = lighting["sources"][0]
    energy, angle, rotation = lamps["applied"]
    assert energy == pytest.approx(sun["irradiance"], rel=1e-6)
    assert angle == pytest.approx(math.radians(2 * SUN_RADIUS), rel=1e-6)
    assert rotation == pytest.approx([0.0, math.radians(90 - SUN_PITCH), -math.radians(SUN_YAW)], abs=1e-6)
    assert lamps["turned"][2] == pytest.approx(-math.radians(SUN_YAW) - turned, abs=1e-6)
    assert lamps["in texture"]

    for case in ("sun lamp", "sun lamp, turned", "in texture", "in texture, turned"):
        values = measured[case]
        # The shadow is where the sun's world direction puts it, and deep.
        assert ratios[case] >= 3.0, (case, ratios, measured)
        # The mirrored patch, towards the sun, is not in shadow: as bright as the open plane but for the
        # sky the cube hides there.
        assert values["mirror"] >= 0.85 * values["open"], (case, measured)
    assert ratios["no hdr"] < 1.5, (ratios, measured)

    # Lamp and texture light the open plane alike, as the irradiance says: albedo 0.8 over pi times the
    # sun's irradiance on the horizontal plane plus the sky's (SKY * pi on a horizontal plane).
    expected = 0.8 / math.pi * (sun["irradiance"] * math.sin(math.radians(SUN_PITCH)) + SKY * math.pi)
    for case in ("sun lamp", "in texture", "sun lamp, turned", "in texture, turned"):
        assert measured[case]["open"] == pytest.approx(expected, rel=0.1), (case, expected, measured)
    assert measured["no hdr"]["open"] == pytest.approx(0.8 * SKY, rel=0.1)


# --- the lamp is SyncSphere's own, and the World's nodes -------------------------------------------------


def _small_jobs(tmp_path):
    """Tiny jobs (8x16 EXRs): a (a sun), b (another sun), nosun (lighting.json without one), bad (a broken
    lighting.json), nosky (no panorama_sky.exr), ldr (no lighting.json). Returns {job: lighting dict}."""
    def sun(**overrides):
        values = {"yaw_deg": 30.0, "pitch_deg": 40.0, "angular_radius_deg": 0.5, "color": [1.0, 0.95, 0.9],
                  "radiance": 5000.0, "irradiance": 9.0, "irradiance_ratio": 6.0, "is_sun": True, "placed": False}
        return {**values, **overrides}

    def json_of(*sources):
        return {"version": 1, "exposure_ev": 0.0, "sun_ratio": 6.0, "diffuse_irradiance": 1.5, "sources": list(sources)}

    jobs = {"a": json_of(sun()),
            "b": json_of(sun(is_sun=False, yaw_deg=100.0, irradiance=0.5),
                         sun(yaw_deg=-60.0, pitch_deg=20.0, angular_radius_deg=2.0, irradiance=4.0,
                             color=[1.0, 0.5, 0.25])),
            "nosun": json_of(sun(is_sun=False)), "bad": {"version": 1, "sources": "none"}, "nosky": json_of(sun())}
    images = {}
    for job in ("a", "b", "nosun", "bad", "nosky", "ldr"):
        images[f"{job}/panorama"] = np.full((8, 16, 3), 0.5, np.float32)
        if job not in ("nosky", "ldr"):
            images[f"{job}/panorama_sky"] = np.full((8, 16, 3), 0.25, np.float32)
    _write_exrs(tmp_path, images)
    for job, data in jobs.items():
        (tmp_path / job / "lighting.json").write_text(json.dumps(data), encoding="utf-8")
    return jobs


def test_the_sun_lamp_is_syncspheres_own_and_follows_the_world(tmp_path):
    """One lamp, made, updated and removed by SyncSphere; the user's lights (one of them named like ours) and a
    copy the user made of ours are never touched. Its rotation and strength follow the World's sockets."""
    jobs = _small_jobs(tmp_path)
    seen = _blender(r"""
def out(job):
    return {"png": "", "exr": os.path.join(TMP, job, "panorama.exr")}

def apply(job):
    return results.apply_result(context, settings, "WORLD", out(job))

def drivers(obj):
    return sorted([d.data_path, d.array_index, d.driver.expression, d.driver.is_simple_expression, d.driver.is_valid,
                   [v.targets[0].id.name for v in d.driver.variables]] for d in obj.animation_data.drivers)

user_world = bpy.data.worlds.new("My World")
scene.world = user_world
user_sun = bpy.data.objects.new("SyncSphere Sun", bpy.data.lights.new("My Sun", "SUN"))
user_sun.data.energy, user_sun.rotation_euler = 3.0, (0.1, 0.2, 0.3)
scene.collection.objects.link(user_sun)
user_lamp = bpy.data.objects.new("My Lamp", bpy.data.lights.new("My Lamp", "POINT"))
scene.collection.objects.link(user_lamp)

def users():
    return [snapshot(user_sun), snapshot(user_lamp)]

seen = {"users": users(), "messages": {}}
settings.mode, settings.hdr, settings.sun_mode = "WORLD", True, "SUN_LAMP"
seen["messages"]["a"] = apply("a")
ours = W.sun_lamp(scene)
seen["a"] = {"lamps": sync_lamps(), "lamp": snapshot(ours), "drivers": drivers(ours), "energy drivers": drivers(ours.data),
             "pointer": scene[W.SCENE_SUN_PROP] == ours, "world": scene.world.name, "users": users()}

# The panel edits the World's sockets: the drivers turn and dim the lamp.
nodes = scene.world.node_tree.nodes
nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2] = 0.5
nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value = 2.0
context.view_layer.update()
seen["edited"] = [ours.rotation_euler[2], ours.data.energy]
# set_world_rotation turns it at once, before any update.
W.set_world_rotation(scene.world, -0.25)
seen["set"] = ours.rotation_euler[2]

# Another job: the same lamp, updated, following the new World.
seen["messages"]["b"] = apply("b")
seen["b"] = {"lamps": sync_lamps(), "same": W.sun_lamp(scene) == ours, "lamp": snapshot(ours), "drivers": drivers(ours),
             "world": scene.world.name, "users": users()}

# A copy the user makes of our lamp is theirs.
copy = ours.copy()
copy.name = "My Copy"
scene.collection.objects.link(copy)
copy_before = snapshot(copy)
settings.sun_mode = "IN_TEXTURE"
seen["messages"]["in texture"] = apply("a")
seen["in texture"] = {"lamps": sync_lamps(), "lights": sorted(bpy.data.lights.keys()), "users": users(),
                      "copy kept": snapshot(copy) == copy_before, "pointer": W.SCENE_SUN_PROP in scene,
                      "nodes": sorted(node.name for node in scene.world.node_tree.nodes),
                      "sky node": W.SKY_ENVIRONMENT_NODE}

seen["cases"] = {}
for case, job, hdr, mode in [("hdr off", "a", False, "SUN_LAMP"), ("no sun", "nosun", True, "SUN_LAMP"),
                             ("bad", "bad", True, "SUN_LAMP"), ("no sky", "nosky", True, "SUN_LAMP"),
                             ("ldr", "ldr", True, "SUN_LAMP")]:
    settings.hdr, settings.sun_mode = True, "SUN_LAMP"
    apply("a")
    made = W.sun_lamp(scene).name
    settings.hdr, settings.sun_mode = hdr, mode
    message = apply(job)
    seen["cases"][case] = {"made": made, "message": message, "lamps": sync_lamps(), "users": users(),
                           "sky nodes": W.SKY_ENVIRONMENT_NODE in scene.world.node_tree.nodes,
                           "light data": sorted(bpy.data.lights.keys())}

# Restoring the user's World takes the lamp away too.
settings.hdr, settings.sun_mode = True, "SUN_LAMP"
apply("a")
seen["restore"] = [W.restore_previous_world(context), scene.world.name, sync_lamps(), users()]

# Update Lighting: the scene's SyncSphere World again with the current settings, its rotation and strength kept.
apply("b")
nodes = scene.world.node_tree.nodes
nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2] = 0.7
nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value = 1.5
settings.sun_mode = "IN_TEXTURE"
seen["update"] = {"in texture": [sorted(bpy.ops.syncsphere.update_lighting()), sync_lamps()["ours"]]}
settings.sun_mode = "SUN_LAMP"
bpy.ops.syncsphere.update_lighting()
context.view_layer.update()
nodes = scene.world.node_tree.nodes
lamp = W.sun_lamp(scene)
seen["update"]["sun lamp"] = [nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2],
                              nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value,
                              lamp.rotation_euler[2], lamp.data.energy, bpy.path.abspath(nodes[W.ENVIRONMENT_NODE].image.filepath)]

# Saved and opened again: still the scene's lamp, updated rather than doubled.
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(TMP, "scene.blend"))
bpy.ops.wm.open_mainfile(filepath=os.path.join(TMP, "scene.blend"))
context = bpy.context
scene = context.scene
settings = scene.syncsphere
user_sun = bpy.data.objects["SyncSphere Sun"]
user_lamp = bpy.data.objects["My Lamp"]
reloaded = W.sun_lamp(scene).name
apply("a")
seen["reloaded"] = [reloaded, sync_lamps(), len([obj for obj in bpy.data.objects if obj.get(W.SUN_PROP)]), users()]
result(seen)
""", tmp_path)
    users = seen["users"]
    assert users[0]["name"] == "SyncSphere Sun" and users[0]["energy"] == 3.0 and not users[0]["animated"]

    # Applied: a new lamp beside the user's (which has the name), pointed to by the scene.
    a = seen["a"]
    assert a["lamps"] == {"ours": "SyncSphere Sun.001", "lights": ["My Lamp", "SyncSphere Sun", "SyncSphere Sun.001"]}
    assert a["pointer"] and a["users"] == users and a["world"] == "SyncSphere World"
    lamp = a["lamp"]
    assert lamp["type"] == "SUN" and lamp["in scene"]
    assert lamp["energy"] == pytest.approx(9.0) and lamp["angle"] == pytest.approx(math.radians(1.0))
    assert lamp["colour"] == pytest.approx([1.0, 0.95, 0.9])
    assert lamp["rotation"] == pytest.approx([0.0, math.radians(50.0), math.radians(-30.0)])
    assert {"syncsphere_sun", "syncsphere_sun_world", "syncsphere_sun_direction"} <= set(lamp["keys"])
    assert seen["messages"]["a"] == "The world 'SyncSphere World' now lights the scene, with its sun as the lamp 'SyncSphere Sun.001'."
    # Simple expressions: Blender evaluates them without running Python (auto-run off).
    (rotation_driver,) = a["drivers"]
    assert rotation_driver[:2] == ["rotation_euler", 2] and rotation_driver[3:] == [True, True, ["SyncSphere World"]]
    (energy_driver,) = a["energy drivers"]
    assert energy_driver[:2] == ["energy", 0] and energy_driver[3:] == [True, True, ["SyncSphere World"]]

    assert seen["edited"] == pytest.approx([math.radians(-30.0) - 0.5, 18.0])
    assert seen["set"] == pytest.approx(math.radians(-30.0) + 0.25)

    b = seen["b"]
    assert b["same"] and b["lamps"] == a["lamps"] and b["users"] == users
    assert b["lamp"]["energy"] == pytest.approx(4.0)  # the sun, not the brighter-looking non-sun source
    assert b["lamp"]["angle"] == pytest.approx(math.radians(4.0))
    assert b["lamp"]["colour"] == pytest.approx([1.0, 0.5, 0.25])
    assert b["lamp"]["rotation"] == pytest.approx([0.0, math.radians(70.0), math.radians(60.0)])
    assert b["drivers"][0][5] == [b["world"]] and b["world"] != a["world"]

    texture = seen["in texture"]
    assert texture["lamps"] == {"ours": None, "lights": ["My Copy", "My Lamp", "SyncSphere Sun"]}
    assert texture["copy kept"] and texture["users"] == users and not texture["pointer"]
    # Our light data stays only because the user's copy shares it.
    assert texture["lights"] == ["My Lamp", "My Sun", "SyncSphere Sun"]
    assert texture["sky node"] not in texture["nodes"]
    assert seen["messages"]["in texture"].endswith("now lights the scene, with its sun in the texture.")

    for case, found in seen["cases"].items():
        assert found["made"] and found["lamps"]["ours"] is None, (case, found)
        assert found["users"] == users and not found["sky nodes"], (case, found)
        assert "My Copy" in found["lamps"]["lights"]
        assert found["light data"] == texture["lights"], (case, found)  # each removed lamp took its light along
    messages = {case: found["message"] for case, found in seen["cases"].items()}
    assert messages["hdr off"].endswith("now lights the scene.")
    assert messages["no sun"].endswith("now lights the scene.")
    assert messages["ldr"].endswith("now lights the scene.")
    assert "lighting could not be read" in messages["bad"] and "list of sources" in messages["bad"]
    assert messages["bad"].endswith("(it has 'none').") and ".." not in messages["bad"]
    assert "panorama_sky.exr is missing, so the sun lights from the image" in messages["no sky"]

    restored, world_name, lamps, restore_users = seen["restore"]
    assert restored and world_name == "My World" and lamps["ours"] is None and restore_users == users

    update = seen["update"]
    assert update["in texture"] == [["FINISHED"], None]
    rotation, strength, lamp_z, energy, image = update["sun lamp"]
    assert (rotation, strength) == pytest.approx((0.7, 1.5))
    assert lamp_z == pytest.approx(math.radians(60.0) - 0.7) and energy == pytest.approx(4.0 * 1.5)
    assert image == str(tmp_path / "b" / "panorama.exr")

    reloaded, lamps, marked, reload_users = seen["reloaded"]
    assert lamps["ours"] == reloaded and marked == 2  # ours and the user's copy of it
    assert reload_users == users



def test_a_lamp_lit_world_shows_the_panorama_to_the_camera_and_the_sky_to_the_rest(tmp_path):
    """The nodes and links of a Sun-lamp World, with and without hide_from_camera; a camera looking at the sun
    sees its disc (and black when hidden), while everything else sees the sky."""
    _write_exrs(tmp_path, {"pano": np.full((8, 16, 3), 7.0, np.float32), "sky": np.full((8, 16, 3), 0.25, np.float32)})
    seen = _blender(r"""
def links(world):
    return sorted([l.from_node.name, l.from_socket.identifier, l.to_node.name, l.to_socket.identifier]
                  for l in world.node_tree.links)

seen = {}
for hide in (False, True):
    world = W.apply_world(context, os.path.join(TMP, "pano.exr"), sky_exr_path=os.path.join(TMP, "sky.exr"),
                          hide_from_camera=hide, rotation=0.3, strength=2.0)
    world.cycles.sampling_method = "NONE"
    nodes = world.node_tree.nodes
    seen[f"hide {hide}"] = {"links": links(world), "count": len(nodes), "sky": world[W.SKY_SOURCE_PROP],
                            "images": [bpy.path.abspath(nodes[name].image.filepath)
                                       for name in (W.ENVIRONMENT_NODE, W.SKY_ENVIRONMENT_NODE)],
                            "rotation": nodes[W.MAPPING_NODE].inputs["Rotation"].default_value[2],
                            "strength": nodes[W.BACKGROUND_NODE].inputs["Strength"].default_value}
    # A narrow camera sees the World; a diffuse plane facing it is lit by what the other rays see.
    scene.render.engine = "CYCLES"
    scene.cycles.device, scene.cycles.samples, scene.cycles.use_denoising = "CPU", 4, False
    scene.render.resolution_x = scene.render.resolution_y = 8
    if scene.camera is None:
        camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
        camera.data.angle = math.radians(40.0)
        camera.rotation_euler = (math.pi / 2, 0.0, -math.pi / 2)  # looking along +X
        scene.collection.objects.link(camera)
        scene.camera = camera
        mesh = bpy.data.meshes.new("plane")  # facing the camera at x = 3, covering the middle of the frame
        mesh.from_pydata([(3, -0.5, -0.5), (3, 0.5, -0.5), (3, 0.5, 0.5), (3, -0.5, 0.5)], [], [(0, 1, 2, 3)])
        mesh.materials.append(bpy.data.materials.new("grey"))
        scene.collection.objects.link(bpy.data.objects.new("plane", mesh))
    image_settings = scene.render.image_settings
    image_settings.file_format, image_settings.color_depth, image_settings.color_mode = "OPEN_EXR", "32", "RGB"
    scene.render.filepath = os.path.join(TMP, "view.exr")
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(scene.render.filepath, check_existing=False)
    pixels = np.array(image.pixels[:], np.float32).reshape(8, 8, 4)[::-1, :, :3]
    seen[f"hide {hide}"]["corner"] = float(pixels[0, 0].mean())
    seen[f"hide {hide}"]["plane"] = float(pixels[3:5, 3:5].mean())
result(seen)
""", tmp_path)
    common = [
        ["SyncSphere Texture Coordinate", "Generated", "SyncSphere Mapping", "Vector"],
        ["SyncSphere Mapping", "Vector", "SyncSphere Environment", "Vector"],
        ["SyncSphere Mapping", "Vector", "SyncSphere Sky Environment", "Vector"],
        ["SyncSphere Light Path", "Is Camera Ray", "SyncSphere Sky Mix", "Factor_Float"],
        ["SyncSphere Sky Environment", "Color", "SyncSphere Sky Mix", "A_Color"],
        ["SyncSphere Environment", "Color", "SyncSphere Sky Mix", "B_Color"],
        ["SyncSphere Sky Mix", "Result_Color", "SyncSphere Background", "Color"],
    ]
    shown, hidden = seen["hide False"], seen["hide True"]
    assert shown["links"] == sorted(common + [["SyncSphere Background", "Background", "SyncSphere World Output", "Surface"]])
    assert hidden["links"] == sorted(common + [
        ["SyncSphere Light Path", "Is Camera Ray", "SyncSphere Camera Mix", "Fac"],
        ["SyncSphere Background", "Background", "SyncSphere Camera Mix", "Shader"],
        ["SyncSphere Camera Background", "Background", "SyncSphere Camera Mix", "Shader_001"],
        ["SyncSphere Camera Mix", "Shader", "SyncSphere World Output", "Surface"],
    ])
    assert (shown["count"], hidden["count"]) == (8, 10)  # one Light Path for both
    for found in (shown, hidden):
        assert found["images"] == [str(tmp_path / "pano.exr"), str(tmp_path / "sky.exr")]
        assert found["sky"] == str(tmp_path / "sky.exr")
        assert (found["rotation"], found["strength"]) == pytest.approx((0.3, 2.0))
        # Lit by the sky (0.25 x strength 2) alone: a 0.8 grey diffuse plane under a uniform 0.5 shows 0.4.
        assert found["plane"] == pytest.approx(0.4, rel=0.05), seen
    assert shown["corner"] == pytest.approx(14.0, rel=1e-4)  # the camera sees the panorama (7 x strength 2)
    assert hidden["corner"] < 1e-6


# --- the Lighting sub-panel and the real settings ----------------------------------------------------------


LIGHTING_SETTINGS = ["hdr", "exposure", "sun_ratio", "use_sun_direction", "sun_yaw", "sun_pitch", "sun_mode"]


def test_the_lighting_panel_the_real_settings_and_the_history(tmp_path):
    """Drawn against tests/test_blender_panels.py's recording layout (this interpreter's bpy, as there): every
    lighting setting in order for a 360° World, Update Lighting only for a SyncSphere World, a line for the
    other modes; the registered defaults are the backend's, and the history keeps the generation settings."""
    from test_blender_panels import _blender as panel_blender, _operators, _props

    report = panel_blender("""
from syncsphere.blender_addon.core import generation
settings.mode = "WORLD"
report = {"user world": draw("SYNCSPHERE_PT_world_lighting")}
W.apply_world(context, write_exr(os.path.join(TMP, "grey.exr"), np.full((4, 8, 3), 0.5, np.float32)))
report["syncsphere world"] = draw("SYNCSPHERE_PT_view3d_lighting")
settings.hdr, settings.use_sun_direction = False, True
report["hdr off"] = draw("SYNCSPHERE_PT_world_lighting")
report["tile"] = []
for mode in ("TILE", "WIDE"):
    settings.mode = mode
    report["tile"].append(draw("SYNCSPHERE_PT_world_lighting"))
properties = settings.bl_rna.properties
report["defaults"] = {name: getattr(properties[name], "default", None) for name in
                      ("hdr", "exposure", "sun_ratio", "use_sun_direction", "sun_yaw", "sun_pitch", "sun_mode")}
report["ranges"] = {name: [properties[name].hard_min, properties[name].hard_max] for name in ("sun_yaw", "sun_pitch")}
report["ranges"]["sun_ratio"] = properties["sun_ratio"].hard_min
report["items"] = [[item.identifier, item.name] for item in properties["sun_mode"].enum_items]
settings.mode, settings.hdr, settings.use_sun_direction = "WORLD", True, False
report["params"] = {"default": generation.generate_params(settings, 7, model="m", device="cpu")}
settings.exposure, settings.sun_ratio, settings.use_sun_direction, settings.sun_yaw, settings.sun_pitch = 0.3, 9.0, True, -20.5, 35.0
report["params"]["set"] = generation.generate_params(settings, 7, model="m", device="cpu")
results.add_history(settings, 7, {"png": "", "exr": ""})
settings.hdr, settings.exposure, settings.sun_ratio, settings.use_sun_direction, settings.sun_yaw, settings.sun_pitch = \
    False, 0.0, 6.0, False, 0.0, 45.0
report["params"]["off"] = generation.generate_params(settings, 7, model="m", device="cpu")
old = settings.history.add()  # an item recorded before these settings existed: the defaults
report["old item"] = [old.hdr, old.exposure, old.sun_ratio, old.use_sun_direction]
settings.history.remove(len(settings.history) - 1)
results.reuse_settings(settings, settings.history[0])
report["reused"] = [settings.hdr, round(settings.exposure, 4), settings.sun_ratio, settings.use_sun_direction,
                    settings.sun_yaw, settings.sun_pitch]
result(report)
""", tmp_path)
    for case in ("user world", "syncsphere world", "hdr off"):
        calls = report[case]
        assert _props(calls, "settings") == LIGHTING_SETTINGS, case
        props = {call["args"]["property"]: call for call in calls if call["method"] == "prop"}
        assert all(set(props[name]["args"]) == {"data", "property"} for name in LIGHTING_SETTINGS)
    assert _operators(report["user world"]) == []
    assert _operators(report["syncsphere world"]) == ["syncsphere.update_lighting"]
    for calls in report["tile"]:
        assert [call["method"] for call in calls] == ["column", "label"] and "360° Worlds" in calls[1]["args"]["text"]
    assert report["defaults"] == {"hdr": True, "exposure": 0.0, "sun_ratio": 6.0, "use_sun_direction": False,
                                  "sun_yaw": 0.0, "sun_pitch": 45.0, "sun_mode": "SUN_LAMP"}
    assert report["ranges"] == {"sun_ratio": pytest.approx(0.1), "sun_yaw": [-180.0, 180.0], "sun_pitch": [-90.0, 90.0]}
    assert report["items"] == [["SUN_LAMP", "Sun Lamp"], ["IN_TEXTURE", "In the World Texture"]]
    hdr_names = ("no_hdr", "exposure", "sun_ratio", "sun_direction")
    picked = {case: {name: params[name] for name in hdr_names if name in params} for case, params in report["params"].items()}
    assert picked == {"default": {}, "set": {"exposure": 0.3, "sun_ratio": 9.0, "sun_direction": "-20.5,35"},
                      "off": {"no_hdr": True}}
    assert report["old item"] == [True, 0.0, 6.0, False]
    assert report["reused"] == [True, 0.3, 9.0, True, -20.5, 35.0]


# --- end to end: the backend's own HDR of a painted sun ---------------------------------------------------


def _painted_sun_png(path, width=PANORAMA_WIDTH):
    """An 8-bit sRGB panorama as a model paints a clear day: a blue sky, paler towards the horizon, brown
    ground, and a sun disc of SUN_RADIUS at (SUN_YAW, SUN_PITCH) clipped to white. Returns ``path``."""
    from PIL import Image

    lon, lat = _equirect_angles(width)
    towards_horizon = np.clip(1.0 - lat / (np.pi / 2), 0.0, 1.0)
    image = np.stack([0.30 + 0.30 * towards_horizon, 0.45 + 0.25 * towards_horizon, np.full_like(lat, 0.85)], axis=-1)
    image[lat < 0] = (0.40, 0.33, 0.25)
    yaw, pitch = math.radians(SUN_YAW), math.radians(SUN_PITCH)
    cos_to_sun = np.sin(lat) * math.sin(pitch) + np.cos(lat) * math.cos(pitch) * np.cos(lon - yaw)
    image[cos_to_sun >= math.cos(math.radians(SUN_RADIUS))] = 1.0
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)
    return path


def test_the_backends_hdr_of_a_painted_sun_casts_the_shadow(tmp_path):
    """The whole path: ``python -m backend hdr`` turns an 8-bit panorama with a clipped sun into the HDR
    files, and Blender, applying them, renders the cube's shadow opposite the sun in both sun modes (lit /
    shadow >= 3), while the same panorama without HDR (its linearised pixels, no lighting.json) does not."""
    png = _painted_sun_png(str(tmp_path / "painted.png"))
    done = subprocess.run([sys.executable, "-m", "backend", "hdr", png, "--out", str(tmp_path / "hdr")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip("the backend's environment (numpy, scipy, OpenEXR) is not this interpreter's")
    assert done.returncode == 0, done.stderr
    lighting = json.loads((tmp_path / "hdr" / "lighting.json").read_text())
    (sun,) = [source for source in lighting["sources"] if source["is_sun"]]
    assert abs(sun["yaw_deg"] - SUN_YAW) < 1 and abs(sun["pitch_deg"] - SUN_PITCH) < 1
    (tmp_path / "ldr").mkdir()
    os.replace(tmp_path / "hdr" / "panorama_sky.exr", tmp_path / "ldr" / "panorama.exr")  # the linearised image
    done = subprocess.run([sys.executable, "-m", "backend", "hdr", png, "--out", str(tmp_path / "hdr"), "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    measured = _blender(f"""
CUBE, CAMERA, SAMPLES, SIZE = {CUBE!r}, {CAMERA!r}, {SAMPLES}, {SIZE}
PATCHES = {patches(0.0)!r}
""" + _SCENE + """
hdr = {"png": "", "exr": os.path.join(TMP, "hdr", "panorama.exr")}
measured = {}
settings.mode, settings.hdr = "WORLD", True
for mode in ("SUN_LAMP", "IN_TEXTURE"):
    settings.sun_mode = mode
    results.apply_result(context, settings, "WORLD", hdr)
    measured[mode] = measure(mode.lower())
settings.hdr = False
results.apply_result(context, settings, "WORLD", {"png": "", "exr": os.path.join(TMP, "ldr", "panorama.exr")})
measured["no hdr"] = measure("no-hdr")
result(measured)
""", tmp_path)
    ratios = {case: values["mirror"] / values["shadow"] for case, values in measured.items()}
    print("painted sun, lit/shadow:", {case: round(ratio, 2) for case, ratio in ratios.items()})
    assert ratios["SUN_LAMP"] >= 3.0 and ratios["IN_TEXTURE"] >= 3.0, ratios
    assert ratios["no hdr"] < 1.5, ratios
