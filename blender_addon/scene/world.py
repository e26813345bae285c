"""Turning a generated equirectangular EXR into the scene's World, and adjusting it afterwards.

The World follows the common asset convention (docs/conventions.md#blender-rules)::

    Texture Coordinate (Generated) -> Mapping (Z rotation) -> Environment Texture (equirectangular)
        -> Background (strength) -> World Output

with, when the camera should not see the image, a Light Path "Is Camera Ray" choosing between that
Background and a plain black one through a Mix Shader. Every node SyncSphere creates has a fixed name
(the ``*_NODE`` constants below) so other code finds it again.

Which direction the image faces (established by the renders in ``tests/test_blender_world.py``, on
Blender 4.2 and 5.0, and written up in ``docs/blender.md``):

- With Mapping rotation 0 the centre of the image (u = 0.5, longitude 0 of docs/conventions.md#directions) lies
  along world **+X**, on the horizon.
- u increases **clockwise seen from above** (+Z): u = 0.25 is along +Y, u = 0.75 along -Y and the
  left/right edges (u = 0 / 1) along -X. For a viewer facing +X that is left-to-right, so the image is
  not mirrored, and the yaw of docs/conventions.md#directions (positive right) is minus the world azimuth:
  yaw 0, pitch 0 of the image = world +X; yaw +90° = world -Y.
- The top row of the file looks up (+Z). Blender stores image pixels bottom row first, so that is the
  *last* row of ``Image.pixels``.
- The Mapping node (type Point) rotates the *lookup* direction: with Z rotation ``r`` the image centre
  appears at world azimuth ``-r`` (atan2(y, x)), i.e. increasing the rotation turns the image
  clockwise seen from above. ``face_camera_rotation`` returns ``-azimuth(camera view)``.

Lighting (issue #8, ``apply_lit_world``): a HDR World whose sun lights the scene as a lamp shows
``panorama.exr`` to camera rays and ``panorama_sky.exr`` (the sun's disc at sky level) to every other
ray, through a ``SKY_MIX_NODE`` colour mix driven by the Light Path's "Is Camera Ray", into the one
Background (so the World's strength stays one socket). The sun is then SyncSphere's own Sun light
(``SUN_NAME``, marked ``obj[SUN_PROP]`` and remembered by the scene in ``scene[SCENE_SUN_PROP]``),
turned with the World's Mapping rotation and scaled with its strength by drivers
(blender_addon/core/lighting.py has the directions; tests/test_blender_lighting.py renders them).
"""

import math
import os
import time

import bpy
import numpy as np
from mathutils import Vector

from ..core import lighting
from ..core.image_input import START_IMAGE_TYPES
from .images import load_image

# Custom properties on Worlds that SyncSphere creates.
SOURCE_PROP = "syncsphere_exr"  # the EXR the world shows; also marks the World as SyncSphere's
PREVIOUS_PROP = "syncsphere_previous_world"  # the World the scene had before SyncSphere (an ID pointer)

# Names of the nodes SyncSphere creates (a node's name is unique within its tree).
TEXCOORD_NODE = "SyncSphere Texture Coordinate"
MAPPING_NODE = "SyncSphere Mapping"
ENVIRONMENT_NODE = "SyncSphere Environment"
BACKGROUND_NODE = "SyncSphere Background"
LIGHT_PATH_NODE = "SyncSphere Light Path"
CAMERA_BACKGROUND_NODE = "SyncSphere Camera Background"
MIX_NODE = "SyncSphere Camera Mix"
OUTPUT_NODE = "SyncSphere World Output"
SKY_ENVIRONMENT_NODE = "SyncSphere Sky Environment"  # panorama_sky.exr, for every ray but camera rays
SKY_MIX_NODE = "SyncSphere Sky Mix"  # Is Camera Ray ? the panorama : the sky, into the Background's colour

SKY_SOURCE_PROP = "syncsphere_sky_exr"  # on a World lit by a lamp: the sky EXR its non-camera rays see

# SyncSphere's Sun lamp: its object's name (Blender adds .001 ... when taken), the marks on the object, and
# the scene's pointer to it. The lamp SyncSphere replaces or removes is the one the scene points to, and
# only if it still carries the mark: never one of the user's lights, nor a copy of ours (a duplicate keeps
# the custom properties but is not the one the scene points to).
SUN_NAME = "SyncSphere Sun"
SUN_PROP = "syncsphere_sun"  # on the lamp object: True
SUN_WORLD_PROP = "syncsphere_sun_world"  # on the lamp object: the World whose rotation and strength it follows
SUN_DIRECTION_PROP = "syncsphere_sun_direction"  # on the lamp object: the source's image [yaw, pitch] in degrees
SCENE_SUN_PROP = "syncsphere_sun"  # on the scene: its SyncSphere Sun lamp (an Object pointer)

# What the camera sees instead of the image when hide_from_camera is set. Black keeps the render
# neutral; users who want another colour edit the node (or use Film > Transparent).
CAMERA_BACKGROUND_COLOR = (0.0, 0.0, 0.0, 1.0)

# Scene-linear colourspace names, newest first. OCIO configs have renamed it between Blender releases
# ("Linear" before 4.0, "Linear Rec.709" in 4.0-5.0); 5.0 also lists the role name "scene_linear".
_LINEAR_COLORSPACES = ("Linear Rec.709", "Linear", "scene_linear")


def is_syncsphere_world(world):
    """Return True when ``world`` (a bpy.types.World or None) was created by ``apply_world``."""
    return world is not None and SOURCE_PROP in world


def _linear_colorspace(image):
    """Return the name of the scene-linear colourspace in this Blender's config, or None if unknown."""
    names = {item.identifier
             for item in image.colorspace_settings.bl_rna.properties["name"].enum_items}
    for name in _LINEAR_COLORSPACES:
        if name in names:
            return name
    return None


def _load_linear_image(exr_path):
    """Load ``exr_path`` as a float image interpreted as scene-linear Rec.709, and return it.

    An image already loaded from the same file is reused but reloaded (``images.load_image``).
    """
    image = load_image(exr_path)
    # The backend writes scene-linear values without colourspace metadata. Blender normally treats
    # such EXRs as linear already, but 5.0 honours an EXR's colorInteropID (and a user may have
    # changed an already-loaded image), so say it explicitly. Assigning the colourspace keeps the
    # float values as they are in the file: no conversion happens for float data in linear spaces.
    name = _linear_colorspace(image)
    if name is not None and image.colorspace_settings.name != name:
        image.colorspace_settings.name = name
    return image


def apply_world(context, exr_path, *, rotation=0.0, strength=1.0, hide_from_camera=False,
                name="SyncSphere World", sky_exr_path=None):
    """Make a new World showing the equirectangular EXR ``exr_path`` and assign it to the scene.

    ``rotation``: Z rotation of the Mapping node in radians (see the module docstring for which way
    the image turns; ``face_camera_rotation`` computes one). ``strength``: the Background's strength.
    ``hide_from_camera``: camera rays see plain black while the image still lights the scene.
    ``name``: the new World's name (Blender adds .001 ... when it is taken).
    ``sky_exr_path``: an equirectangular EXR that every ray but camera rays sees instead of ``exr_path``
    (the HDR sky without its sun, when a lamp is the sun); camera rays still see ``exr_path`` (or black
    with ``hide_from_camera``). Both images share the Mapping node and the Background's strength.

    Always creates a new World and never edits an existing one, so the user's World and earlier
    SyncSphere worlds keep their nodes. The scene's previous World is remembered on the new one
    (``world[PREVIOUS_PROP]``) for ``restore_previous_world``; when the scene already shows a
    SyncSphere world, the World *that* one remembered is carried over, so restoring always returns to
    the user's own World rather than to an earlier generation. Earlier SyncSphere worlds get no fake
    user: like any World Blender unassigns, they stay in the file until it is saved and reopened
    without them being used.

    Returns the new bpy.types.World. Raises FileNotFoundError when ``exr_path`` (or ``sky_exr_path``) is
    not a file.
    """
    exr_path = os.path.abspath(bpy.path.abspath(exr_path))
    if not os.path.isfile(exr_path):
        raise FileNotFoundError(f"The world image {exr_path} does not exist.")
    if sky_exr_path is not None:
        sky_exr_path = os.path.abspath(bpy.path.abspath(sky_exr_path))
        if not os.path.isfile(sky_exr_path):
            raise FileNotFoundError(f"The sky image {sky_exr_path} does not exist.")
    # Load first: when the file cannot be read, no half-built World is left behind.
    image = _load_linear_image(exr_path)
    sky_image = _load_linear_image(sky_exr_path) if sky_exr_path is not None else None

    scene = context.scene
    current = scene.world
    previous = current.get(PREVIOUS_PROP) if is_syncsphere_world(current) else current

    world = bpy.data.worlds.new(name)
    if bpy.app.version < (5, 0, 0):
        # 5.0 deprecates use_nodes (Worlds always use nodes there); older versions need it to get a tree.
        world.use_nodes = True
    tree = world.node_tree
    tree.nodes.clear()  # drop the default Background / Output: the tree is built below with our names
    nodes, links = tree.nodes, tree.links

    def add(kind, node_name, x, y):
        node = nodes.new(kind)
        node.name = node.label = node_name
        node.location = (x, y)
        return node

    texcoord = add("ShaderNodeTexCoord", TEXCOORD_NODE, -900, 0)
    mapping = add("ShaderNodeMapping", MAPPING_NODE, -700, 0)
    mapping.vector_type = "POINT"  # rotates the lookup direction (the default; stated for clarity)
    environment = add("ShaderNodeTexEnvironment", ENVIRONMENT_NODE, -500, 0)
    environment.image = image
    environment.projection = "EQUIRECTANGULAR"
    background = add("ShaderNodeBackground", BACKGROUND_NODE, -200, 0)
    output = add("ShaderNodeOutputWorld", OUTPUT_NODE, 300, 0)
    output.is_active_output = True

    # For a World, Generated coordinates are the view direction in world space.
    links.new(texcoord.outputs["Generated"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], environment.inputs["Vector"])
    # One Light Path for the sky mix (camera rays see the panorama, the others the sky) and hide_from_camera.
    light_path = add("ShaderNodeLightPath", LIGHT_PATH_NODE, -200, 300) if sky_image is not None or hide_from_camera else None
    if sky_image is not None:
        sky = add("ShaderNodeTexEnvironment", SKY_ENVIRONMENT_NODE, -500, -300)
        sky.image = sky_image
        sky.projection = "EQUIRECTANGULAR"
        sky_mix = add("ShaderNodeMix", SKY_MIX_NODE, -350, 0)
        sky_mix.data_type = "RGBA"  # Mix (not clamped): HDR values pass unchanged
        sockets = {socket.identifier: socket for socket in (*sky_mix.inputs, *sky_mix.outputs)}
        links.new(mapping.outputs["Vector"], sky.inputs["Vector"])
        # Factor 0 -> A (the sky) for every ray but camera rays; 1 -> B (the panorama) for camera rays.
        links.new(light_path.outputs["Is Camera Ray"], sockets["Factor_Float"])
        links.new(sky.outputs["Color"], sockets["A_Color"])
        links.new(environment.outputs["Color"], sockets["B_Color"])
        links.new(sockets["Result_Color"], background.inputs["Color"])
    else:
        links.new(environment.outputs["Color"], background.inputs["Color"])
    if hide_from_camera:
        camera_background = add("ShaderNodeBackground", CAMERA_BACKGROUND_NODE, -200, -200)
        camera_background.inputs["Color"].default_value = CAMERA_BACKGROUND_COLOR
        camera_background.inputs["Strength"].default_value = 1.0
        mix = add("ShaderNodeMixShader", MIX_NODE, 100, 0)
        # Fac 0 -> first shader (the image) for every ray but camera rays; Fac 1 -> the plain colour.
        links.new(light_path.outputs["Is Camera Ray"], mix.inputs[0])
        links.new(background.outputs["Background"], mix.inputs[1])
        links.new(camera_background.outputs["Background"], mix.inputs[2])
        links.new(mix.outputs["Shader"], output.inputs["Surface"])
    else:
        links.new(background.outputs["Background"], output.inputs["Surface"])

    set_world_rotation(world, rotation)
    set_world_strength(world, strength)

    world[SOURCE_PROP] = exr_path
    if sky_exr_path is not None:
        world[SKY_SOURCE_PROP] = sky_exr_path
    if previous is not None:
        # An ID pointer rather than a name: it follows renames, and it is a real user of the old
        # World, so that World is still in the file after save and reload although no scene uses it.
        world[PREVIOUS_PROP] = previous
    scene.world = world
    return world


def _named_node(world, name):
    """The node called ``name`` in ``world``'s node tree, or None (no tree, or no such node: the user may have
    deleted or renamed any node SyncSphere made)."""
    return world.node_tree.nodes.get(name) if world.node_tree else None


def rotation_socket(world):
    """The Rotation input of a SyncSphere world's Mapping node (its Z component turns the image), or None when
    ``world`` has no node named ``MAPPING_NODE``. The panel draws it, so edits are live and undoable."""
    node = _named_node(world, MAPPING_NODE)
    return node.inputs["Rotation"] if node is not None else None


def strength_socket(world):
    """The Strength input of a SyncSphere world's image Background, or None when ``world`` has no node named
    ``BACKGROUND_NODE``. The panel draws it, so edits are live and undoable."""
    node = _named_node(world, BACKGROUND_NODE)
    return node.inputs["Strength"] if node is not None else None


def set_world_rotation(world, radians):
    """Set the Z rotation (radians) of a SyncSphere world's Mapping node.

    Returns True when the node was found and set, False when ``world`` has no node named
    ``MAPPING_NODE`` (not a SyncSphere world, or the user deleted it). X and Y rotations are kept.
    """
    socket = rotation_socket(world)
    if socket is None:
        return False
    socket.default_value[2] = radians
    # SyncSphere's lamps that follow this World turn with it. Their drivers do the same on the next
    # depsgraph update (and for edits of the socket itself, as the panel makes); this sets the value now.
    for obj in bpy.data.objects:
        if obj.get(SUN_PROP) and obj.get(SUN_WORLD_PROP) == world and SUN_DIRECTION_PROP in obj:
            yaw, pitch = obj[SUN_DIRECTION_PROP]
            obj.rotation_euler = lighting.sun_lamp_rotation(yaw, pitch, radians)
    return True


def world_rotation(world):
    """The Z rotation (radians) of a SyncSphere world's Mapping node; 0 when it has none."""
    socket = rotation_socket(world)
    return socket.default_value[2] if socket is not None else 0.0


def world_strength(world):
    """The strength of a SyncSphere world's image Background; 1 when it has none."""
    socket = strength_socket(world)
    return socket.default_value if socket is not None else 1.0


def set_world_strength(world, value):
    """Set the strength of a SyncSphere world's image Background (not of the camera's plain colour).

    Returns True when the node was found and set, False when ``world`` has no node named
    ``BACKGROUND_NODE``.
    """
    socket = strength_socket(world)
    if socket is None:
        return False
    socket.default_value = value
    return True


def restore_previous_world(context):
    """Give the scene back the World it had before SyncSphere replaced it.

    Reads the previous World remembered on the scene's current (SyncSphere) World. Returns True when
    it was assigned (SyncSphere's Sun lamp, if the scene has one, is removed with it); False, changing
    nothing, when the current World is not a SyncSphere world, the scene had no World before, or that
    World has since been deleted. The SyncSphere world itself is kept (unassigned) in
    ``bpy.data.worlds``.
    """
    scene = context.scene
    current = scene.world
    if not is_syncsphere_world(current):
        return False
    previous = current.get(PREVIOUS_PROP)
    # Deleting the World clears the pointer; a user could also have put anything in the property.
    if not isinstance(previous, bpy.types.World):
        return False
    scene.world = previous
    remove_sun_lamp(scene)  # its sun belongs to the SyncSphere world, not to the user's
    return True


def face_camera_rotation(camera_object):
    """Return the Mapping Z rotation (radians, in [-pi, pi]) that puts the image centre ahead of a camera.

    ``camera_object``: any object; its ``matrix_world`` (parents and constraints included, so it must
    be up to date, which it is in operators) gives the view direction, local -Z. Only the horizontal
    part of that direction counts: the image centre is on the horizon, straight ahead of the camera
    in plan view, whatever its pitch and roll. A camera looking straight up or down has no
    horizontal view direction; then the way its frame's top (looking down) or bottom (looking up)
    points is used: the heading the camera would have if it were tilted slightly towards the horizon.

    The image centre faces world azimuth ``-rotation`` (module docstring), so the result is minus the
    camera's azimuth atan2(y, x).
    """
    basis = camera_object.matrix_world.to_3x3().normalized()  # scale must not tilt the direction
    forward = basis @ Vector((0.0, 0.0, -1.0))
    heading = forward.xy
    if heading.length < 1e-6:
        # Looking along Z: the camera's up vector (local +Y) is horizontal. It points away from the
        # viewer's horizon when looking up, towards it when looking down.
        up = (basis @ Vector((0.0, 1.0, 0.0))).xy
        heading = -up if forward.z > 0 else up
    if heading.length < 1e-9:
        return 0.0  # degenerate matrix (zero scale): nothing to face
    return -math.atan2(heading.y, heading.x) + 0.0  # + 0.0 turns -0.0 into 0.0


# --- lighting: a HDR World and its sun (issue #8) ----------------------------------------------------------


def sun_lamp(scene):
    """SyncSphere's Sun lamp of ``scene``: the object ``scene[SCENE_SUN_PROP]`` points to, if it is still a
    light marked ``SUN_PROP``; else None. Never one of the user's lights."""
    obj = scene.get(SCENE_SUN_PROP)
    if isinstance(obj, bpy.types.Object) and obj.get(SUN_PROP) and obj.type == "LIGHT":
        return obj
    return None


def remove_sun_lamp(scene):
    """Delete SyncSphere's Sun lamp of ``scene`` (``sun_lamp``) and its light data when nothing else uses it.
    Returns True when there was one; the user's lights are never touched."""
    obj = sun_lamp(scene)
    if SCENE_SUN_PROP in scene:
        del scene[SCENE_SUN_PROP]
    if obj is None:
        return False
    light = obj.data
    bpy.data.objects.remove(obj)
    if light is not None and light.users == 0:
        bpy.data.lights.remove(light)
    return True


def _drive(owner, path, index, world, data_path, expression):
    """Replace the driver of ``owner``'s ``path`` (``index``: array element or -1) with ``expression`` of
    the variable ``value``: ``world``'s ``data_path``. Only arithmetic, so Blender evaluates it without
    Python (a "simple expression"; it works when auto-run of scripts is off)."""
    owner.driver_remove(path, index)
    driver = (owner.driver_add(path, index) if index >= 0 else owner.driver_add(path)).driver
    driver.type = "SCRIPTED"
    variable = driver.variables.new()
    variable.name = "value"
    variable.type = "SINGLE_PROP"
    variable.targets[0].id_type = "WORLD"
    variable.targets[0].id = world
    variable.targets[0].data_path = data_path
    driver.expression = expression
    return driver


def set_sun_lamp(context, world, source):
    """Create or update SyncSphere's Sun lamp so that it is ``source`` (a lighting.Source) of ``world``.

    One lamp per scene (``sun_lamp``): made when the scene has none (named SUN_NAME, linked to the scene's
    collection), else updated in place, keeping its location; linked to the scene again if it was
    unlinked. Its rotation shines from the source's direction under the World's Mapping rotation, its
    angle is the source's angular diameter, its colour the source's, and its strength the source's
    irradiance times the World's Background strength. Drivers on the rotation's Z angle and on the
    strength read the World's Mapping and Background sockets, so turning or dimming the World in the
    panel turns and dims the lamp with it. Returns the lamp object.
    """
    scene = context.scene
    obj = sun_lamp(scene)
    if obj is None:
        obj = bpy.data.objects.new(SUN_NAME, bpy.data.lights.new(SUN_NAME, "SUN"))
        obj.location = (0.0, 0.0, 5.0)  # anywhere: a Sun lights from its direction only
        obj[SUN_PROP] = True
        scene[SCENE_SUN_PROP] = obj
    elif obj.data.type != "SUN":
        obj.data.type = "SUN"
    if scene.objects.get(obj.name) != obj:
        scene.collection.objects.link(obj)

    rotation, strength = world_rotation(world), world_strength(world)
    light = obj.data
    light.angle = lighting.sun_lamp_angle(source.angular_radius_deg)
    light.color = source.color
    light.energy = lighting.sun_lamp_strength(source.irradiance, strength)
    obj.rotation_mode = "XYZ"
    obj.rotation_euler = lighting.sun_lamp_rotation(source.yaw_deg, source.pitch_deg, rotation)
    obj[SUN_WORLD_PROP] = world
    obj[SUN_DIRECTION_PROP] = [source.yaw_deg, source.pitch_deg]

    # Z angle = world_azimuth(yaw, rotation) = -yaw - rotation; strength = irradiance * World strength.
    _drive(obj, "rotation_euler", 2, world,
           f'node_tree.nodes["{MAPPING_NODE}"].inputs["Rotation"].default_value[2]',
           f"{lighting.world_azimuth(source.yaw_deg, 0.0)!r} - value")
    _drive(light, "energy", -1, world, f'node_tree.nodes["{BACKGROUND_NODE}"].inputs["Strength"].default_value',
           f"{float(source.irradiance)!r} * value")
    return obj


def apply_lit_world(context, outputs, *, hdr=True, sun_mode=lighting.SUN_LAMP, rotation=0.0, strength=1.0,
                    hide_from_camera=False):
    """Apply a 360° World job's ``outputs`` ({"exr": path, ...}) with its lighting; returns (World, note).

    With ``hdr`` and a readable lighting.json next to the EXR (``lighting.lighting_files``) that has a sun:
    ``sun_mode`` SUN_LAMP makes the World show the panorama to the camera and panorama_sky.exr to every other
    ray (``apply_world``'s ``sky_exr_path``) and the sun SyncSphere's Sun lamp (``set_sun_lamp``); IN_TEXTURE
    shows the panorama to every ray, so its bright disc lights the scene. Anything else (``hdr`` off, no
    lighting.json, no sun, IN_TEXTURE, or SUN_LAMP without panorama_sky.exr, which would light the scene
    twice) applies the panorama alone and removes SyncSphere's lamp if the scene has one.
    ``rotation``, ``strength``, ``hide_from_camera``: as for ``apply_world``.

    The note ends the sentence "The world ... now lights the scene": empty, or what the sun does, or why
    the lighting could not be used. Raises FileNotFoundError when the EXR is missing.
    """
    lighting_path, sky_path = lighting.lighting_files(outputs)
    sun, note = None, ""
    if hdr and lighting_path is not None:
        try:
            sun = lighting.read_lighting(lighting_path).sun
        except lighting.LightingError as error:
            note = f"; its lighting could not be read, so it lights from its image alone: {str(error).rstrip('.')}"
    use_lamp = sun is not None and sun_mode == lighting.SUN_LAMP
    if use_lamp and sky_path is None:
        use_lamp = False
        note = f"; {lighting.SKY_EXR_FILE} is missing, so the sun lights from the image instead of a lamp"
    new_world = apply_world(context, outputs["exr"], rotation=rotation, strength=strength,
                            hide_from_camera=hide_from_camera, sky_exr_path=sky_path if use_lamp else None)
    if use_lamp:
        lamp = set_sun_lamp(context, new_world, sun)
        note = f", with its sun as the lamp '{lamp.name}'"
    else:
        remove_sun_lamp(context.scene)
        if sun is not None and not note:
            note = ", with its sun in the texture"
    return new_world, note


def world_image(world):
    """The image a World shows: its SyncSphere Environment node's (the panorama, not the sky made for the sun
    lamp), else the first Environment Texture node's with an image; None when ``world`` (a World or None) has
    none."""
    if world is None or not world.use_nodes or world.node_tree is None:
        return None
    nodes = world.node_tree.nodes
    own = nodes.get(ENVIRONMENT_NODE)
    if own is not None and own.type == "TEX_ENVIRONMENT" and own.image is not None:
        return own.image
    return next((node.image for node in nodes
                 if node.type == "TEX_ENVIRONMENT" and node.name != SKY_ENVIRONMENT_NODE and node.image is not None),
                None)


def world_image_file(world, folder):
    """An absolute path the backend can read the image of ``world`` (``world_image``) from, or None when the World
    shows no image. The image's own file when it is an unedited, unpacked .png, .jpg or .exr on disk; otherwise
    (packed, generated, edited, or another file type) a copy of its pixels written into ``folder``: an OpenEXR
    for a float image, else a PNG. The user's image is only read, never changed."""
    image = world_image(world)
    if image is None:
        return None
    path = bpy.path.abspath(image.filepath_raw) if image.filepath_raw else ""
    if (image.source == "FILE" and image.packed_file is None and not image.is_dirty and os.path.isfile(path)
            and os.path.splitext(path)[1].lower() in START_IMAGE_TYPES):
        return os.path.abspath(path)
    width, height = image.size
    if not width or not height:
        return None
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    extension, file_format = (".exr", "OPEN_EXR") if image.is_float else (".png", "PNG")
    target = os.path.join(folder, f"world-image-{os.getpid()}-{time.time_ns()}{extension}")
    copy = bpy.data.images.new("SyncSphere start image", width, height, alpha=True, float_buffer=image.is_float)
    try:
        copy.pixels.foreach_set(pixels)
        copy.filepath_raw = target
        copy.file_format = file_format
        copy.save()
    finally:
        bpy.data.images.remove(copy)
    return target
