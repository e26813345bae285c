"""The "Export Cubemap" operator: the scene's SyncSphere World image as six cube faces and a cross.

The work is the backend's ``python -m backend cubemap`` (backend/app/file_commands.py, backend/products/cubemap.py), run with the configured
backend interpreter on the EXR the World shows. It writes face_F, face_R, face_B, face_L, face_U, face_D
and cubemap_dice as float EXRs, in py360convert's orientation and layout (docs/engine.md): F is the
image's centre, whatever the World's Mapping rotation.

The lead registers ``classes``; nothing here registers itself.
"""

import os

import bpy
from bpy.props import IntProperty, StringProperty
from bpy.types import Operator

from ..blender_addon.core import backend_command
from ..blender_addon.core.panel_words import in_panel_words
from ..blender_addon.scene.preferences import get_preferences, interpreter_path
from ..blender_addon.scene.world import SOURCE_PROP, is_syncsphere_world

# Where the files go when no folder is chosen: this sub-folder next to the World's EXR.
DEFAULT_SUBFOLDER = "cubemap"

# Seconds the export may take. It is numpy work on one image (a few seconds for 4096 x 2048), but it
# blocks Blender's UI, so it must not hang forever.
EXPORT_TIMEOUT_S = 300.0


def world_image(context):
    """Return ``(exr_path, None)`` for the scene's SyncSphere World, or ``(None, reason)`` in one sentence."""
    world = context.scene.world
    if not is_syncsphere_world(world):
        return None, "The scene's World is not a SyncSphere world: generate a 360° world first"
    exr = bpy.path.abspath(world[SOURCE_PROP])
    if not os.path.isfile(exr):
        return None, f"The World's image {exr} no longer exists"
    return exr, None


def default_folder(exr_path):
    """The folder the cube map goes to by default: ``cubemap`` next to ``exr_path``."""
    return os.path.join(os.path.dirname(exr_path), DEFAULT_SUBFOLDER)


def backend_sentence(text):
    """The backend's own one-sentence error (after its "error: ") in ``run_backend``'s failure text, in the panel's
    words (``in_panel_words``), else the text."""
    marker = "error: "
    return in_panel_words(text.rsplit(marker, 1)[1].strip()) if marker in text else text


class SYNCSPHERE_OT_export_cubemap(Operator):
    """Write the World's image as six cube faces and the cross layout, as EXR files"""

    bl_idname = "syncsphere.export_cubemap"
    bl_label = "Export Cubemap"
    bl_options = {"REGISTER"}

    directory: StringProperty(
        name="Folder",
        description="Folder for face_F ... face_D and cubemap_dice; existing files of those names are "
        "replaced (empty: a 'cubemap' folder next to the World's image)",
        subtype="DIR_PATH",
    )
    face_size: IntProperty(
        name="Face Size",
        description="Width and height of each face in pixels (0: a quarter of the image's width, "
        "which keeps its detail)",
        default=0,
        min=0,
        max=16384,
        subtype="PIXEL",
    )

    def invoke(self, context, event):
        """Ask for the folder (pre-filled with the default one) and the face size, then export."""
        exr, problem = world_image(context)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        if not self.directory:
            self.directory = default_folder(exr)
        # A dialog rather than the file browser: the default folder does not exist yet, and the
        # folder field still has a button that opens the file browser.
        return context.window_manager.invoke_props_dialog(self, confirm_text="Export")

    def execute(self, context):
        """Run ``python -m backend cubemap`` on the World's EXR and report where the files went."""
        exr, problem = world_image(context)
        python = interpreter_path(get_preferences(context))
        problem = problem or backend_command.interpreter_error(python)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        folder = bpy.path.abspath(self.directory) if self.directory.strip() else default_folder(exr)
        folder = os.path.abspath(folder)
        args = ["cubemap", exr, "--out", folder, "--overwrite"]  # exporting again updates the files
        if self.face_size:
            args += ["--face-size", str(self.face_size)]
        # Blocking: a short one-shot job the user asked for, bounded by the timeout.
        ok, text = backend_command.run_backend(python, *args, allow_network=bpy.app.online_access,
                                               timeout=EXPORT_TIMEOUT_S)
        if not ok:
            self.report({"ERROR"}, f"Exporting the cubemap failed: {backend_sentence(text)}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Wrote the six cube faces and the cross (cubemap_dice) to {folder}")
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_export_cubemap,)
