"""The picture of a generation while it paints: the backend's preview PNGs in one reused Blender image, and for a
360° World, when the scene's setting asks for it, live in the viewport's World.

The backend writes a preview of the canvas every few denoising steps (``--preview-every``; docs/protocol.md) and
names it in its progress events; ``worker_client.GenerationJob`` keeps the latest path. ``follow_job``, called on
every timer tick of the Generate operator, copies each new one into the image ``PREVIEW_IMAGE`` (the panel draws
it, ``panels/preview.py``) and, with ``scene.syncsphere.preview_in_world`` on and a World job, shows it through a
temporary World; when the job ends the scene gets its own World back and the temporary one is deleted, before
the result is applied.

The image holds copies of the pixels, not a link to the file: the backend replaces the file at every preview and
deletes it when the job ends. It has no users (the panel draws its icon), so it is not saved with the .blend.
Nothing here touches a datablock the user made: the image and World carry ``PREVIEW_PROP``.
"""

import bpy
import numpy as np

PREVIEW_IMAGE = "SyncSphere Preview"
PREVIEW_WORLD = "SyncSphere Preview World"
PREVIEW_PROP = "syncsphere_preview"  # on the preview image and World: True
PREVIOUS_WORLD_PROP = "syncsphere_preview_previous"  # on the preview World: the World the scene had (an ID pointer)

# (job id, preview_count) of the preview shown last: a follower shows each new preview once.
_shown = None


def preview_image():
    """SyncSphere's preview image (``PREVIEW_IMAGE``, marked ``PREVIEW_PROP``), or None before the first preview."""
    image = bpy.data.images.get(PREVIEW_IMAGE)
    return image if image is not None and image.get(PREVIEW_PROP) else None


def show_preview(path):
    """Copy the PNG at ``path`` (8-bit sRGB, any size) into the preview image and return it.

    The image is made on first use (byte pixels, sRGB, no alpha) and resized to the PNG's size when it differs;
    its icon (``Image.preview``, what the panel draws) is regenerated. Returns None, changing nothing, when the
    file cannot be read: the backend deletes it when the job ends, so a late reader may find it gone.
    """
    try:
        loaded = bpy.data.images.load(path, check_existing=False)
    except RuntimeError:
        return None
    try:
        width, height = loaded.size  # reading the size loads the file (images load lazily)
        if not width or not height:
            return None
        pixels = np.empty(width * height * 4, dtype=np.float32)
        loaded.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(loaded)
    image = preview_image()
    if image is None:
        image = bpy.data.images.new(PREVIEW_IMAGE, width, height, alpha=False)
        image[PREVIEW_PROP] = True
    elif tuple(image.size) != (width, height):
        image.scale(width, height)
    # Byte images hand their stored values through ``pixels`` unconverted, so the copy is exact.
    image.pixels.foreach_set(pixels)
    image.update()
    if image.preview is not None:
        image.preview.reload()  # the panel's icon shows the new pixels
    return image


def preview_world(scene):
    """The scene's temporary preview World (``PREVIEW_WORLD``, marked ``PREVIEW_PROP``) when it shows one, else None."""
    world = scene.world
    return world if world is not None and world.get(PREVIEW_PROP) else None


def show_in_world(context, image):
    """Show ``image`` (an equirectangular preview) as the scene's World, live in the viewport: the first call
    remembers the scene's World and assigns a new temporary World whose Environment Texture shows ``image``
    (Texture Coordinate Generated → Environment → Background → World Output, the image centre along +X as with
    the finished World at rotation 0); later calls find it and keep it. ``end_world_preview`` undoes it."""
    scene = context.scene
    world = preview_world(scene)
    if world is not None:
        return world
    world = bpy.data.worlds.new(PREVIEW_WORLD)
    world[PREVIEW_PROP] = True
    if scene.world is not None:
        world[PREVIOUS_WORLD_PROP] = scene.world
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True  # deprecated in 5.0, where Worlds always have a tree
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    texcoord = nodes.new("ShaderNodeTexCoord")
    environment = nodes.new("ShaderNodeTexEnvironment")
    environment.image = image
    background = nodes.new("ShaderNodeBackground")
    output = nodes.new("ShaderNodeOutputWorld")
    for x, node in enumerate((texcoord, environment, background, output)):
        node.location = (x * 300 - 600, 0)
    links.new(texcoord.outputs["Generated"], environment.inputs["Vector"])
    links.new(environment.outputs["Color"], background.inputs["Color"])
    links.new(background.outputs["Background"], output.inputs["Surface"])
    scene.world = world
    return world


def end_world_preview(context):
    """Give the scene back the World it had before ``show_in_world`` (none, if it had none, or if that World was
    deleted meanwhile) and delete the temporary World. Returns True when there was one; nothing else changes."""
    scene = context.scene
    world = preview_world(scene)
    if world is None:
        return False
    previous = world.get(PREVIOUS_WORLD_PROP)
    scene.world = previous if isinstance(previous, bpy.types.World) else None
    bpy.data.worlds.remove(world)
    return True


def follow_job(context, job):
    """Follow ``job`` (a ``worker_client.GenerationJob``) on a timer tick, after its ``poll``: when a preview arrived
    that is not shown yet, copy it into the preview image (``show_preview``) and, for an equirect job with the
    scene's ``preview_in_world`` on, show it in the World (``show_in_world``); once the job has ended, end the
    World preview, so the result is applied onto the scene's own World. Returns the image when a new preview was
    shown, else None."""
    global _shown
    if job is None:
        return None
    if job.finished:
        end_world_preview(context)
        return None
    if job.preview is None or _shown == (job.id, job.preview_count):
        return None
    _shown = (job.id, job.preview_count)
    image = show_preview(job.preview)
    if image is not None and context.scene.syncsphere.preview_in_world and job.params.get("layout") == "equirect":
        show_in_world(context, image)
    return image
