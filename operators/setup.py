"""The "Set Up Backend" operator of the preferences: make SyncSphere's own backend Python.

It creates a virtual environment in SyncSphere's user folder (which survives extension upgrades) with
Blender's bundled Python, installs the extension's requirements.txt into it, and points the "Backend
Python" preference at it. The work is ``blender_addon.core.backend_setup.BackendSetup``; this module only
starts it and follows it. It downloads several gigabytes, so it runs only when Blender's online access
allows (docs/conventions.md#blender-rules); otherwise it explains how to allow it or how to use an existing Python.

The lead registers ``classes``; nothing here registers itself.
"""

import os
import sys

import bpy
from bpy.types import Operator

from ..blender_addon.core import backend_setup
from ..blender_addon.scene.preferences import get_preferences, user_folder
from .generate import redraw_areas

# Sub-folders of SyncSphere's user folder: the environment, and the log (outside the environment,
# because a failed setup removes the environment's folder).
ENV_SUBFOLDER = "backend-env"
LOG_SUBFOLDER = "logs"
LOG_NAME = "backend-setup.log"

# What pip installs, and extra ``pip install`` arguments (an index URL, for example). Module-level so a
# test can point them at a local package.
REQUIREMENTS_FILE = backend_setup.REQUIREMENTS_FILE
EXTRA_PIP_ARGS = ()

# Seconds between two looks at the running setup in the UI.
_TIMER_S = 0.5

# The setup started last (running or finished): one at a time, and panels may show its progress.
_setup = None


def running_setup():
    """Return the backend setup that is running now, or None.

    Panels (for example the preferences) can draw its ``status_text()`` and ``fraction``.
    """
    return _setup if _setup is not None and not _setup.finished else None


def online_access():
    """Return whether Blender allows this add-on to download (``bpy.app.online_access``)."""
    return bpy.app.online_access


def setup_refusal(online):
    """Return why setting up the backend is not allowed now, or None when it is.

    Takes whether online access is allowed. Returns ``backend_setup.offline_explanation()`` when it
    is not: downloading without the user's consent is against the extension rules.
    """
    if not online:
        return backend_setup.offline_explanation()
    return None


def _show_status(context, text):
    """Show ``text`` in the status bar (None clears it) and redraw the preferences."""
    # Every workspace: the user may switch workspaces while pip runs, and a stale text must not stay.
    for workspace in bpy.data.workspaces:
        workspace.status_text_set(text if workspace == context.workspace else None)
    redraw_areas(context, {"PREFERENCES"})


class SYNCSPHERE_OT_setup_backend(Operator):
    """Create a Python environment in SyncSphere's user folder and install the backend into it (downloads several GB)"""

    bl_idname = "syncsphere.setup_backend"
    bl_label = "Set Up Backend"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        """Only one setup at a time."""
        if running_setup() is not None:
            cls.poll_message_set("The backend is already being set up")
            return False
        return True

    def execute(self, context):
        """Start the setup; in background mode wait for it, else follow it from a modal timer."""
        global _setup
        problem = setup_refusal(online_access())
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        if get_preferences(context) is None:
            self.report({"ERROR"}, "SyncSphere's preferences are not available: enable the add-on first")
            return {"CANCELLED"}
        # Blender's bundled Python: the same version as Blender's, and always there.
        base = backend_setup.find_base_python(sys.prefix, sys.executable)
        if base is None:
            self.report({"ERROR"}, f"Blender's bundled Python was not found in {sys.prefix!r}: set "
                                   "\"Backend Python\" to an existing Python with the backend installed")
            return {"CANCELLED"}
        try:
            folder = user_folder(ENV_SUBFOLDER)
            log_path = os.path.join(user_folder(LOG_SUBFOLDER), LOG_NAME)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}

        self._setup = _setup = backend_setup.BackendSetup(
            base, folder, REQUIREMENTS_FILE, EXTRA_PIP_ARGS, log_path=log_path)
        _setup.start()
        if bpy.app.background or context.window is None:
            # No event loop (scripts, tests): wait, printing progress as it changes.
            last = None
            while not _setup.wait(1.0):
                text = _setup.status_text()
                if text != last:
                    print(text, flush=True)
                    last = text
            return self.finish(context)
        wm = context.window_manager
        self._timer = wm.event_timer_add(_TIMER_S, window=context.window)
        wm.modal_handler_add(self)
        _show_status(context, self._setup.status_text())
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        """Esc cancels; on each timer tick show the progress, and finish once the setup has ended."""
        setup = self._setup
        if event.type == "ESC" and event.value == "PRESS" and not setup.finished:
            setup.cancel()  # the thread cleans up; a later tick sees it finished
            _show_status(context, "Cancelling the backend setup...")
            return {"RUNNING_MODAL"}  # Esc was for us, not for the editor under the mouse
        if event.type != "TIMER":
            return {"PASS_THROUGH"}  # Blender stays usable during the download
        if not setup.finished:
            _show_status(context, setup.status_text() + " - Esc cancels")
            return {"PASS_THROUGH"}
        self._remove_timer(context)
        return self.finish(context)

    def cancel(self, context):
        """Blender ends the operator (its window closed, Blender quits): stop pip, remove the half env."""
        self._setup.cancel()
        self._remove_timer(context)
        _show_status(context, None)

    def _remove_timer(self, context):
        """Remove the modal timer once."""
        if getattr(self, "_timer", None) is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None

    def finish(self, context):
        """Report how the setup ended; on success make the new environment the backend's Python."""
        setup = self._setup
        if not bpy.app.background:
            _show_status(context, None)
        if setup.state == "cancelled":
            self.report({"WARNING"}, "Backend setup cancelled")
            return {"CANCELLED"}
        if setup.state != "done":
            self.report({"ERROR"}, setup.error)
            return {"CANCELLED"}
        prefs = get_preferences(context)
        message = f"The backend environment is ready: \"Backend Python\" is now {setup.python}"
        if prefs is None:
            message = f"The backend environment is ready; set \"Backend Python\" to {setup.python}"
        else:
            prefs.python_path = setup.python
            # A change made by a script does not mark the preferences as changed, so auto-save would
            # not keep it.
            context.preferences.is_dirty = True
            if not context.preferences.use_preferences_save:
                message += " (save the preferences to keep it)"
        self.report({"INFO"}, message)
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_setup_backend,)
