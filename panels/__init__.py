"""SyncSphere panels, drawn the same in the World properties tab and in the 3D viewport sidebar.

Thin: they draw ``scene.syncsphere`` (blender_addon/scene/properties.py), the preferences, and the state of the
current job (blender_addon/core/session.py), and call the operators.
"""

import bpy
from bpy.types import Panel

from ..blender_addon.core import generation, image_input, model_list, session
from ..blender_addon.scene import material, world
from ..blender_addon.scene.preferences import draw_sentence, get_preferences
from ..blender_addon.scene.results import thumbnail_icon
from .first_run import draw_first_run
from .preview import draw_preview


def draw_main(layout, context):
    """The artist's controls, in the order they are decided: Prompt; Style (its menu, then the Style Prompt and
    Avoid it filled, both editable); Mode; Size (with Width and Height when it is Custom); Quality (with a note when
    the Advanced settings make its schedule dense); Start from Image (Image File with File, Strength with a file
    or the World's image); Seed; Generate with its Variations count, or Cancel with the batch's progress; the last error and the
    latest result. Research controls are in the Advanced sub-panel, the model in Backend."""
    # First run (panels/first_run.py): what to do before Generate works, the backend then the model, on top.
    draw_first_run(layout, context)

    settings = context.scene.syncsphere
    prefs = get_preferences(context)
    column = layout.column()
    column.use_property_split = True
    column.use_property_decorate = False
    column.prop(settings, "prompt")
    # The Style menu is an operator's (it fills the two fields below): drawn in the split column's two parts.
    split = column.split(factor=0.4)
    split.alignment = "RIGHT"
    split.label(text="Style")
    split.operator_menu_enum("syncsphere.apply_style", "style", text=generation.STYLE_NAMES[settings.style])
    column.prop(settings, "style_prompt")
    column.prop(settings, "negative_prompt", text="Avoid")
    column.row().prop(settings, "mode", expand=True)
    # The sizes follow the chosen model's view size (1024 px for SDXL): the label says what will be sent.
    window_px = model_list.native_window_px(prefs.default_model, model_list.cached_models()) if prefs else \
        model_list.DEFAULT_WINDOW_PX
    if settings.resolution == generation.CUSTOM_SIZE:  # checked before a job: preflight.custom_size_problem
        column.prop(settings, "resolution", text="Size")
        size = column.column(align=True)
        size.prop(settings, "custom_width")
        size.prop(settings, "custom_height")
    else:
        width, height = generation.resolution(settings.mode, settings.resolution, window_px)
        column.prop(settings, "resolution", text=f"Size ({width}x{height})")
    column.prop(settings, "quality")
    note = generation.schedule_note(settings)
    if note:
        column.label(text=note, icon="INFO")
    # Start from Image (core/image_input.py): a file or the World's image, re-drawn as much as Strength says.
    column.prop(settings, "start_image_source")
    if settings.start_image_source == image_input.START_FROM_FILE:
        column.prop(settings, "start_image_path")
    if settings.start_image_source != image_input.START_FROM_NOISE:
        column.prop(settings, "strength", slider=True)
    # Extend Photo (360° World only): the photo kept where its camera saw it, the world painted around it.
    if settings.mode == "WORLD":
        column.prop(settings, "extend_photo")
        if settings.extend_photo:
            column.prop(settings, "photo_path")
            column.prop(settings, "photo_fov")
            row = column.row(align=True)
            row.prop(settings, "photo_yaw")
            row.prop(settings, "photo_pitch")
    row = column.row(align=True)
    row.prop(settings, "seed")
    row.prop(settings, "randomize_seed", text="", icon="FILE_REFRESH", toggle=True)

    batch = session.current_batch()
    if session.is_busy():
        layout.progress(factor=batch.job.progress_fraction, text=batch.status_text)
        layout.operator("syncsphere.cancel", icon="CANCEL")
        draw_preview(layout, context)  # the picture while it paints (issue 21): panels/preview.py
    else:
        row = layout.row(align=True)
        count = settings.variations
        row.operator("syncsphere.generate", text=f"Generate {count}" if count > 1 else "Generate", icon="RENDER_STILL")
        row.prop(settings, "variations")
        job = session.current_job()
        if job is not None and job.state == "error":
            draw_sentence(layout, job.error, "ERROR")
    if settings.history:  # a preview of the latest result
        icon = thumbnail_icon(settings.history[0].png_path)
        if icon:
            layout.template_icon(icon_value=icon, scale=6.0)


def draw_socket(layout, socket, text, index=-1):
    """Draw a node socket's value (component ``index`` of a vector; -1: all), or, when the node is gone
    (``socket`` None), a note saying that ``text`` cannot be shown."""
    if socket is not None:
        layout.prop(socket, "default_value", index=index, text=text)
    else:
        layout.label(text=f"{text}: its SyncSphere node was deleted", icon="INFO")


def draw_result(layout, context):
    """How the result sits in the scene: the SyncSphere World's rotation and strength (its nodes' own
    sockets, so edits are live) and camera options, or the active material's tiling."""
    settings = context.scene.syncsphere
    column = layout.column()
    column.use_property_split = True
    column.use_property_decorate = False
    if settings.mode == "WORLD":
        scene_world = context.scene.world
        if world.is_syncsphere_world(scene_world):
            # The nodes' own sockets, found by the World's accessors: a node the user deleted leaves a note.
            draw_socket(column, world.rotation_socket(scene_world), "Rotation", index=2)
            draw_socket(column, world.strength_socket(scene_world), "Strength")
            column.operator("syncsphere.export_cubemap", icon="EXPORT")
        column.prop(settings, "hide_from_camera")
        column.prop(settings, "face_camera")
        column.prop(settings, "preview_in_world")  # how a running job shows (panels/preview.py)
        column.operator("syncsphere.restore_world", icon="LOOP_BACK")
    elif settings.mode == "TILE":
        obj = context.active_object
        socket = material.tile_scale_socket(obj.active_material if obj is not None else None)
        if socket is not None:
            column.prop(socket, "default_value", text="Tiling")
        else:
            column.label(text="The texture goes on the active object's material")
        column.operator("syncsphere.bake_to_uv", icon="RENDER_RESULT")
    else:
        column.label(text="Wide images open in the Image Editor")


def draw_lighting(layout, context):
    """A 360° World's HDR settings (sent with the next Generate; exposure and ratio greyed out without HDR,
    yaw and pitch without Sun Direction, which also asks the views for the sun without HDR), how its sun
    lights the scene, and Update Lighting for the SyncSphere World the scene shows."""
    settings = context.scene.syncsphere
    column = layout.column()
    column.use_property_split = True
    column.use_property_decorate = False
    if settings.mode != "WORLD":
        column.label(text="Lighting is made for 360° Worlds")
        return
    column.prop(settings, "hdr")
    hdr = column.column()
    hdr.active = settings.hdr
    hdr.prop(settings, "exposure")
    hdr.prop(settings, "sun_ratio")
    column.prop(settings, "use_sun_direction")
    direction = column.column(align=True)
    direction.active = settings.use_sun_direction
    direction.prop(settings, "sun_yaw")
    direction.prop(settings, "sun_pitch")
    mode = column.column()
    mode.active = settings.hdr
    mode.prop(settings, "sun_mode")
    if world.is_syncsphere_world(context.scene.world):
        column.operator("syncsphere.update_lighting", icon="LIGHT_SUN")


def draw_advanced(layout, context):
    """The research controls, as they were in the main panel: steps and guidance; for a 360° World the view set
    and the sky and ground prompts (they act on the views that look up and down); synchronisation (From Quality,
    or a method with its options, drawn only when it is chosen; merged attention always), window, stride, device
    memory and weights (quantisation)."""
    settings = context.scene.syncsphere
    column = layout.column()
    column.use_property_split = True
    column.use_property_decorate = False
    column.prop(settings, "steps")
    column.prop(settings, "guidance")
    if settings.mode == "WORLD":  # only a 360° World has views that look up and down
        column.prop(settings, "view_set")
        column.prop(settings, "prompt_up")
        column.prop(settings, "prompt_down")
    column.prop(settings, "sync_method")
    if settings.sync_method == "SYNCDIFFUSION":  # its options mean nothing to the other methods
        column.prop(settings, "sync_weight")
        column.prop(settings, "sync_steps")
        column.prop(settings, "sync_fast")
    elif settings.sync_method == "SYNCSDE":
        column.prop(settings, "syncsde_lambda")
    column.prop(settings, "mad")  # composes with every method
    column.prop(settings, "window")
    column.prop(settings, "stride")
    column.prop(settings, "device")
    column.prop(settings, "memory")
    column.prop(settings, "quantize")


# What a history item says after its quality about a method chosen in Advanced (none: From Quality).
HISTORY_METHOD_LABELS = {"MULTIDIFFUSION": ", MultiDiffusion", "SYNCDIFFUSION": ", SyncDiffusion", "SYNCSDE": ", SyncSDE"}


def draw_history(layout, context):
    """Past generations with a thumbnail, title (named after the prompt), seed, mode and quality, and how each ran
    (its schedule and views per step, when its metadata said); apply one again, reuse its settings, or upscale it
    x2 or x4."""
    settings = context.scene.syncsphere
    if not settings.history:
        layout.label(text="Nothing generated yet")
    for index, item in enumerate(settings.history[:8]):
        box = layout.box()
        row = box.row()
        icon = thumbnail_icon(item.png_path)
        if icon:
            row.template_icon(icon_value=icon, scale=3.0)
        column = row.column()
        # Named after the prompt (results.generation_title); items from before titles existed show their prompt.
        column.label(text=item.title or item.prompt or "(no prompt)")
        method = HISTORY_METHOD_LABELS.get(item.sync_method, "")
        column.label(text=f"Seed {item.seed}, {item.mode.lower()}, {generation.QUALITY_NAMES[item.quality]}{method}")
        if item.run_summary:
            column.label(text=item.run_summary)
        buttons = column.row(align=True)
        buttons.operator("syncsphere.history_apply", text="Apply").index = index
        buttons.operator("syncsphere.history_reuse", text="Reuse").index = index
        # Upscale: a new result from this one's image (operators/generate.py, SYNCSPHERE_OT_history_upscale).
        for scale in image_input.UPSCALE_FACTORS:
            upscale = buttons.operator("syncsphere.history_upscale", text=f"x{scale}", icon="FULLSCREEN_ENTER")
            upscale.index, upscale.scale = index, scale


def draw_backend(layout, context):
    """The model (the preferences' Default Model as a menu of the installed models, and as text for an id or path
    of one's own), the backend interpreter, and the backend check."""
    prefs = get_preferences(context)
    column = layout.column()
    if prefs is not None:
        column.use_property_split = True
        column.use_property_decorate = False
        column.prop(prefs, "default_model_menu", text="Model")
        column.prop(prefs, "default_model", text="Model ID or Path")
        if prefs.backend_kind == "SSH":
            column.prop(prefs, "ssh_host", text="SSH Host")
        elif prefs.backend_kind == "SERVER":
            column.prop(prefs, "server_url", text="Server URL")
        else:
            column.prop(prefs, "python_path", text="Python")
    row = layout.row(align=True)
    row.operator("syncsphere.check_backend", icon="CONSOLE")
    row.operator("syncsphere.open_output_folder", text="", icon="FILE_FOLDER")


# (label, draw function, closed by default) of the sub-panels under the main panel.
SUB_PANELS = (
    ("Result", draw_result, False),
    ("Lighting", draw_lighting, False),
    ("Advanced", draw_advanced, True),
    ("History", draw_history, True),
    ("Backend", draw_backend, True),
)

# Where the panels appear: the World properties tab and the 3D viewport's sidebar tab "SyncSphere".
LOCATIONS = {
    "WORLD": dict(bl_space_type="PROPERTIES", bl_region_type="WINDOW", bl_context="world"),
    "VIEW3D": dict(bl_space_type="VIEW_3D", bl_region_type="UI", bl_category="SyncSphere"),
}


def _panel_class(location, label, draw_function, parent=None, closed=False):
    """A Panel class drawing ``draw_function`` at ``location`` (a LOCATIONS key), under ``parent``'s id."""
    idname = f"SYNCSPHERE_PT_{location.lower()}" + (f"_{label.lower()}" if parent else "")
    attributes = dict(LOCATIONS[location], bl_idname=idname, bl_label=label,
                      draw=lambda self, context: draw_function(self.layout, context))
    if parent:
        attributes["bl_parent_id"] = parent
    if closed:
        attributes["bl_options"] = {"DEFAULT_CLOSED"}
    return type(idname, (Panel,), attributes)


def _all_panel_classes():
    classes = []
    for location in LOCATIONS:
        main = _panel_class(location, "SyncSphere", draw_main)
        classes.append(main)
        classes += [_panel_class(location, label, draw, main.bl_idname, closed) for label, draw, closed in SUB_PANELS]
    return tuple(classes)


_CLASSES = _all_panel_classes()

# Blender's own helper: registers in order (parents before sub-panels), unregisters in reverse.
register, unregister = bpy.utils.register_classes_factory(_CLASSES)
