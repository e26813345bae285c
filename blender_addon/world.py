"""Turning a generated equirectangular EXR into the scene's World, and adjusting it afterwards.

The World follows the common asset convention (design section 7)::

    Texture Coordinate (Generated) -> Mapping (Z rotation) -> Environment Texture (equirectangular)
        -> Background (strength) -> World Output

with, when the camera should not see the image, a Light Path "Is Camera Ray" choosing between that
Background and a plain black one through a Mix Shader. Every node SyncSphere creates has a fixed name
(the ``*_NODE`` constants below) so other code finds it again.

Which direction the image faces (established by the renders in ``tests/test_blender_world.py``, on
Blender 4.2 and 5.0, and written up in ``docs/blender.md``):

- With Mapping rotation 0 the centre of the image (u = 0.5, longitude 0 of design section 3) lies
  along world **+X**, on the horizon.
- u increases **clockwise seen from above** (+Z): u = 0.25 is along +Y, u = 0.75 along -Y and the
  left/right edges (u = 0 / 1) along -X. For a viewer facing +X that is left-to-right, so the image is
  not mirrored, and design section 3's yaw (positive turns right) is minus the world azimuth:
  yaw 0, pitch 0 of the image = world +X; yaw +90° = world -Y.
- The top row of the file looks up (+Z). Blender stores image pixels bottom row first, so that is the
  *last* row of ``Image.pixels``.
- The Mapping node (type Point) rotates the *lookup* direction: with Z rotation ``r`` the image centre
  appears at world azimuth ``-r`` (atan2(y, x)), i.e. increasing the rotation turns the image
  clockwise seen from above. ``face_camera_rotation`` returns ``-azimuth(camera view)``.
"""

import math
import os

import bpy
from mathutils import Vector

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
                name="SyncSphere World"):
    """Make a new World showing the equirectangular EXR ``exr_path`` and assign it to the scene.

    ``rotation``: Z rotation of the Mapping node in radians (see the module docstring for which way
    the image turns; ``face_camera_rotation`` computes one). ``strength``: the Background's strength.
    ``hide_from_camera``: camera rays see plain black while the image still lights the scene.
    ``name``: the new World's name (Blender adds .001 ... when it is taken).

    Always creates a new World and never edits an existing one, so the user's World and earlier
    SyncSphere worlds keep their nodes. The scene's previous World is remembered on the new one
    (``world[PREVIOUS_PROP]``) for ``restore_previous_world``; when the scene already shows a
    SyncSphere world, the World *that* one remembered is carried over, so restoring always returns to
    the user's own World rather than to an earlier generation. Earlier SyncSphere worlds get no fake
    user: like any World Blender unassigns, they stay in the file until it is saved and reopened
    without them being used.

    Returns the new bpy.types.World. Raises FileNotFoundError when ``exr_path`` is not a file.
    """
    exr_path = os.path.abspath(bpy.path.abspath(exr_path))
    if not os.path.isfile(exr_path):
        raise FileNotFoundError(f"The world image {exr_path} does not exist.")
    # Load first: when the file cannot be read, no half-built World is left behind.
    image = _load_linear_image(exr_path)

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
    links.new(environment.outputs["Color"], background.inputs["Color"])
    if hide_from_camera:
        light_path = add("ShaderNodeLightPath", LIGHT_PATH_NODE, -200, 300)
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
    if previous is not None:
        # An ID pointer rather than a name: it follows renames, and it is a real user of the old
        # World, so that World is still in the file after save and reload although no scene uses it.
        world[PREVIOUS_PROP] = previous
    scene.world = world
    return world


def set_world_rotation(world, radians):
    """Set the Z rotation (radians) of a SyncSphere world's Mapping node.

    Returns True when the node was found and set, False when ``world`` has no node named
    ``MAPPING_NODE`` (not a SyncSphere world, or the user deleted it). X and Y rotations are kept.
    """
    node = world.node_tree.nodes.get(MAPPING_NODE) if world.node_tree else None
    if node is None:
        return False
    node.inputs["Rotation"].default_value[2] = radians
    return True


def set_world_strength(world, value):
    """Set the strength of a SyncSphere world's image Background (not of the camera's plain colour).

    Returns True when the node was found and set, False when ``world`` has no node named
    ``BACKGROUND_NODE``.
    """
    node = world.node_tree.nodes.get(BACKGROUND_NODE) if world.node_tree else None
    if node is None:
        return False
    node.inputs["Strength"].default_value = value
    return True


def restore_previous_world(context):
    """Give the scene back the World it had before SyncSphere replaced it.

    Reads the previous World remembered on the scene's current (SyncSphere) World. Returns True when
    it was assigned; False, changing nothing, when the current World is not a SyncSphere world, the
    scene had no World before, or that World has since been deleted. The SyncSphere world itself is
    kept (unassigned) in ``bpy.data.worlds``.
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
