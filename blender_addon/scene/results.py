"""Putting a finished generation into the scene (the World, the active object's material, or an image), named
after its prompt, and the history of generations."""

import bpy

from ..core.generation import run_summary
from ..core.names import image_name, prompt_title, slug, unique_name
from . import material, world

# The kinds of datablocks a result creates, as bpy.data's collections: those new ones are named after the prompt.
NAMED_KINDS = ("worlds", "materials", "images")


def tile_target(context):
    """The object a tileable texture goes on: the active object when it is a mesh, else None."""
    obj = context.active_object
    return obj if obj is not None and obj.type == "MESH" else None


def result_problem(context, mode):
    """Why a result of ``mode`` (WORLD, TILE, WIDE) could not go into the scene as it is now, in one sentence for
    the artist, or None. Checked by Generate before the job starts: a tileable texture needs an active mesh."""
    if mode == "TILE" and tile_target(context) is None:
        return "Select a mesh object first: the tileable texture goes on the active object's material"
    return None


def apply_result(context, settings, mode, outputs, title=None):
    """Apply a job's ``outputs`` ({"png", "exr", "metadata"} paths) for ``mode`` (WORLD, TILE, WIDE), naming what
    it creates after ``title`` (``name_new_datablocks``; Generate and History's Apply pass the generation's title;
    None keeps the appliers' own names, "SyncSphere World" ...).

    WORLD: a new SyncSphere World from the EXR, facing the camera and hidden from it if the settings say so,
    lit as the Lighting settings say (``world.apply_lit_world``: with HDR, a Sun lamp or the sun in the
    texture, from the lighting.json next to the EXR).
    TILE: the PNG as a tiling texture on the active object's material. WIDE: the PNG in the Image Editor.
    Returns a short sentence saying what was done. Raises ValueError when TILE has no mesh to go on.
    """
    before = datablock_names()
    if mode == "WORLD":
        camera = context.scene.camera
        rotation = world.face_camera_rotation(camera) if settings.face_camera and camera is not None else 0.0
        new_world, note = world.apply_lit_world(context, outputs, hdr=settings.hdr, sun_mode=settings.sun_mode,
                                                rotation=rotation, hide_from_camera=settings.hide_from_camera)
        name_new_datablocks(before, title)
        return f"The world '{new_world.name}' now lights the scene{note}."
    if mode == "TILE":
        obj = tile_target(context)
        if obj is None:
            raise ValueError("Select a mesh object to put the tileable texture on; the image is kept in the history.")
        new_material = material.apply_tile_texture(obj, outputs["png"])
        name_new_datablocks(before, title)
        return f"The texture is on '{obj.name}' (material '{new_material.name}')."
    image = material.load_image_in_editor(outputs["png"])
    name_new_datablocks(before, title)
    return f"The panorama is loaded as the image '{image.name}'."


def datablock_names():
    """The names of every datablock of the NAMED_KINDS now: {kind: set of names}, for ``name_new_datablocks``."""
    return {kind: set(getattr(bpy.data, kind).keys()) for kind in NAMED_KINDS}


def name_new_datablocks(before, title):
    """Name the Worlds, materials and images created since ``before`` (``datablock_names``) after ``title`` (None:
    leave them as they are):
    a World or material is called ``title``, an image after its file with "panorama" put as the title's slug
    ("Sunlit Valley" -> "sunlit-valley.exr", "sunlit-valley_sky.exr"), each made unique among its kind
    ("Sunlit Valley 2", "sunlit-valley-2.exr"). Datablocks that existed before (the user's material a texture
    went on, an image reloaded from the same file) keep their names."""
    if title is None:
        return
    for kind in NAMED_KINDS:
        collection = getattr(bpy.data, kind)
        for block in [block for block in collection if block.name not in before[kind]]:
            taken = set(collection.keys()) - {block.name}
            if kind == "images":
                block.name = unique_name(image_name(block.filepath, slug(title)), taken, separator="-")
            else:
                block.name = unique_name(title, taken)


def generation_title(settings, prompt, title=None):
    """The title of a new generation of ``prompt`` (``names.prompt_title``; ``title`` instead when given, e.g.
    "Harbour At Dusk x2" for an upscale), unique among the items of ``settings.history`` and the Worlds and
    materials, so its World or material can carry the same name."""
    taken = {item.title for item in settings.history}
    taken |= set(bpy.data.worlds.keys()) | set(bpy.data.materials.keys())
    return unique_name(title or prompt_title(prompt), taken)


# The settings a history item records and Reuse copies back, besides the seed (recorded as the one used).
HISTORY_SETTINGS = ("prompt", "style", "style_prompt", "negative_prompt", "mode", "resolution", "custom_width",
                    "custom_height", "steps", "guidance",
                    "quality", "sync_method", "sync_weight", "sync_steps", "sync_fast", "syncsde_lambda", "mad",
                    "view_set", "prompt_up", "prompt_down")
# The lighting's generation settings (not sun_mode: how a result is applied, not how it was made).
HISTORY_SETTINGS += ("hdr", "exposure", "sun_ratio", "use_sun_direction", "sun_yaw", "sun_pitch")


def history_values(settings):
    """The HISTORY_SETTINGS of ``settings`` now, as a dict: what Generate records for each of its jobs, taken when
    it is pressed (the panel may change while a batch runs)."""
    return {name: getattr(settings, name) for name in HISTORY_SETTINGS}


def add_history(settings, seed, outputs, title=None, values=None):
    """Record a finished generation at the top of ``settings.history``: its settings (``values``, a
    ``history_values`` dict; default: ``settings`` now), ``seed``, its ``title`` (default: ``generation_title``),
    the files of ``outputs`` and, from its metadata.json (``outputs["metadata"]``, if any), how it ran
    (``run_summary``). Returns the new item."""
    values = values or history_values(settings)
    title = title or generation_title(settings, values["prompt"])
    item = settings.history.add()
    for name, value in values.items():
        setattr(item, name, value)
    item.title = title
    item.seed = seed
    item.png_path = outputs["png"]
    item.exr_path = outputs["exr"]
    item.run_summary = run_summary(outputs.get("metadata"))
    settings.history.move(len(settings.history) - 1, 0)
    settings.history_index = 0
    # ``item`` still points at the collection's last slot, which the move filled with another item.
    return settings.history[0]


def reuse_settings(settings, item):
    """Copy a history ``item``'s prompts (style included), mode, seed, sampling, quality, synchronisation (merged
    attention included), view set and lighting back into ``settings``."""
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
