"""Putting a finished generation into the scene: the World, the active object's material, or an image."""

import bpy

from ..core.generation import run_summary
from . import material, world


def apply_result(context, settings, mode, outputs):
    """Apply a job's ``outputs`` ({"png", "exr", "metadata"} paths) for ``mode`` (WORLD, TILE, WIDE).

    WORLD: a new SyncSphere World from the EXR, facing the camera and hidden from it if the settings say so,
    lit as the Lighting settings say (``world.apply_lit_world``: with HDR, a Sun lamp or the sun in the
    texture, from the lighting.json next to the EXR).
    TILE: the PNG as a tiling texture on the active object's material. WIDE: the PNG in the Image Editor.
    Returns a short sentence saying what was done. Raises ValueError when TILE has no mesh to go on.
    """
    if mode == "WORLD":
        camera = context.scene.camera
        rotation = world.face_camera_rotation(camera) if settings.face_camera and camera is not None else 0.0
        new_world, note = world.apply_lit_world(context, outputs, hdr=settings.hdr, sun_mode=settings.sun_mode,
                                                rotation=rotation, hide_from_camera=settings.hide_from_camera)
        return f"The world '{new_world.name}' now lights the scene{note}."
    if mode == "TILE":
        obj = context.active_object
        if obj is None or obj.type != "MESH":
            raise ValueError("Select a mesh object to put the tileable texture on; the image is kept in the history.")
        new_material = material.apply_tile_texture(obj, outputs["png"])
        return f"The texture is on '{obj.name}' (material '{new_material.name}')."
    image = material.load_image_in_editor(outputs["png"])
    return f"The panorama is loaded as the image '{image.name}'."


# The settings a history item records and Reuse copies back, besides the seed (recorded as the one used).
HISTORY_SETTINGS = ("prompt", "negative_prompt", "mode", "resolution", "steps", "guidance", "quality",
                    "sync_method", "sync_weight", "sync_steps", "sync_fast", "syncsde_lambda", "mad",
                    "view_set", "prompt_up", "prompt_down")
# The lighting's generation settings (not sun_mode: how a result is applied, not how it was made).
HISTORY_SETTINGS += ("hdr", "exposure", "sun_ratio", "use_sun_direction", "sun_yaw", "sun_pitch")


def add_history(settings, seed, outputs):
    """Record a finished generation at the top of ``settings.history``: its settings, ``seed``, the files of
    ``outputs`` and, from its metadata.json (``outputs["metadata"]``, if any), how it ran (``run_summary``).
    Returns the new item."""
    item = settings.history.add()
    for name in HISTORY_SETTINGS:
        setattr(item, name, getattr(settings, name))
    item.seed = seed
    item.png_path = outputs["png"]
    item.exr_path = outputs["exr"]
    item.run_summary = run_summary(outputs.get("metadata"))
    settings.history.move(len(settings.history) - 1, 0)
    settings.history_index = 0
    return item


def reuse_settings(settings, item):
    """Copy a history ``item``'s prompts, mode, seed, sampling, quality, synchronisation (merged attention
    included), view set and lighting back into ``settings``."""
    for name in HISTORY_SETTINGS + ("seed",):
        setattr(settings, name, getattr(item, name))
    settings.randomize_seed = False


# Thumbnails of history items: one preview collection, created on first use, freed on unregister.
_previews = None


def thumbnail_icon(path):
    """An icon id for the image at ``path`` (a cached preview), or 0 when it cannot be read."""
    global _previews
    import bpy.utils.previews

    if _previews is None:
        _previews = bpy.utils.previews.new()
    if path not in _previews:
        try:
            _previews.load(path, path, "IMAGE")
        except (RuntimeError, KeyError, OSError):
            return 0
    return _previews[path].icon_id


def free_thumbnails():
    """Release the preview collection (on unregister)."""
    global _previews
    import bpy.utils.previews

    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
