"""SyncSphere operators. Thin: they read the preferences and call into ``blender_addon`` (``core``, ``scene``).

Here: check that the configured backend interpreter can run the backend, and open the output folder.
``generate.py``: generate (with its variations and the checks before a job), cancel, the style menu, history and world operators; ``setup.py``: set up the backend environment; ``bake.py``: bake to a UV image; ``export.py``: export the World as a cube map; ``lighting.py``: update a World's lighting; ``models.py``: the preferences' Models list (refresh, download, cancel, remove, set as default).
"""

import os

import bpy
from bpy.types import Operator

from ..blender_addon.core import backend_command, server_client
from ..blender_addon.scene.preferences import get_preferences, interpreter_path, output_folder, remote_backend
from . import bake, export, generate, lighting, models, setup


class SYNCSPHERE_OT_check_backend(Operator):
    """Run 'python -m backend info' with the configured interpreter (on the SSH host when Backend is SSH) and
    report what it prints"""

    bl_idname = "syncsphere.check_backend"
    bl_label = "Check Backend"
    bl_options = {"REGISTER"}

    def execute(self, context):
        """Run the check and report the backend's output or a readable error."""
        prefs = get_preferences(context)
        remote = remote_backend(prefs)
        # Blocking on purpose: this is a one-shot check the user asked for, bounded by a timeout.
        # The long-lived worker used for generation will not block the UI.
        # `info` downloads nothing, but keep the backend offline when Blender is.
        server = isinstance(remote, server_client.ServerBackend)
        if remote is not None and not bpy.app.online_access:
            ok, text = False, (server_client.SERVER_NEEDS_ONLINE_ACCESS if server else backend_command.SSH_NEEDS_ONLINE_ACCESS)
        elif server:
            ok, text = server_client.check_server(remote)
        elif remote is not None:
            ok, text = backend_command.run_remote_backend(remote, "info", allow_network=bpy.app.online_access)
        else:
            ok, text = backend_command.run_backend(interpreter_path(prefs), "info", allow_network=bpy.app.online_access)
        if not ok:
            self.report({"ERROR"}, text)
            return {"CANCELLED"}
        # The Info editor shows the whole report; the status bar shows its first line.
        self.report({"INFO"}, "SyncSphere backend OK:\n" + (text or "(no output)"))
        return {"FINISHED"}


class SYNCSPHERE_OT_open_output_folder(Operator):
    """Open the folder SyncSphere writes generated images to in the system file browser"""

    bl_idname = "syncsphere.open_output_folder"
    bl_label = "Open Output Folder"
    bl_options = {"REGISTER"}

    def execute(self, context):
        """Resolve the output folder (creating the default one) and open it."""
        try:
            folder = output_folder(get_preferences(context))
        except ValueError as exc:
            # Only an installed extension has a user folder; a folder set in the preferences works
            # everywhere.
            self.report({"ERROR"}, f"No output folder: set one in the SyncSphere preferences ({exc})")
            return {"CANCELLED"}
        if not os.path.isdir(folder):
            self.report({"ERROR"}, f"The output folder {folder!r} does not exist")
            return {"CANCELLED"}
        return bpy.ops.wm.path_open(filepath=folder)


_CLASSES = (SYNCSPHERE_OT_check_backend, SYNCSPHERE_OT_open_output_folder, *generate.classes, *setup.classes,
            *bake.classes, *export.classes, *lighting.classes)


# Blender's own helper: registers in order, unregisters in reverse.
_register_classes, _unregister_classes = bpy.utils.register_classes_factory(_CLASSES)


def register():
    """Register every operator; ``models`` also schedules listing the installed models after start-up."""
    _register_classes()
    models.register()


def unregister():
    """Unregister every operator (``models`` first: it stops a running download), in reverse order."""
    models.unregister()
    _unregister_classes()
