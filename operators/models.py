"""The Models list's operators: refresh, download (with Cancel), remove, set as default.

Thin: the work is ``blender_addon.core.model_list``, run with the configured backend Python. A download runs in
its own process; in the UI a timer (``follow_download``) takes in its progress and redraws the preferences,
in background mode (scripts, tests: Blender's timers never fire) the operator waits for it and prints its
progress. Downloads need Blender's online access, like the backend setup (docs/conventions.md#blender-rules).
"""

import bpy
from bpy.props import StringProperty
from bpy.types import Operator

from ..blender_addon.core import backend_command, model_list
from ..blender_addon.scene.preferences import get_preferences, interpreter_path, model_folders
from . import setup
from .generate import redraw_areas

# Seconds between two looks at a running download in the UI.
_TIMER_S = 0.25
# Seconds between two looks for a usable backend Python, until the models have been listed.
_WATCH_S = 2.0


def _backend(context):
    """The backend Python and the environment for a model command, as ``(python, env)``. Raises
    ``model_list.ModelCommandError`` with the sentence saying why when no usable backend Python is set."""
    python = interpreter_path(get_preferences(context))
    problem = backend_command.interpreter_error(python)
    if problem:
        raise model_list.ModelCommandError(problem)
    # Listing and removing download nothing; a download starts only when online access is allowed.
    return python, backend_command.backend_environment(allow_network=setup.online_access())


def _list_command(context=None):
    """``models list`` for the installed models (the hub cache and the Model Folder) as (command, env, cwd).
    Raises ``model_list.ModelCommandError`` when no usable backend Python is set."""
    python, env = _backend(context)
    arguments = model_list.list_arguments(model_folders(get_preferences(context)))
    return backend_command.backend_command(python, *arguments), env, backend_command.EXTENSION_DIR


def refresh_models(context):
    """List the installed models into ``model_list``'s cache. Returns None, or the sentence saying why it failed."""
    try:
        model_list.refresh(*_list_command(context))
    except model_list.ModelCommandError as error:
        return str(error)
    return None


# The automatic listing (list_when_a_backend_is_set): the backend Python it last ran with, and its thread.
_listed_with = None
_listing = None


def list_when_a_backend_is_set():
    """A timer from start-up until the models have been listed: as soon as a usable backend Python is set (at
    start-up, by Set Up Backend, or typed in the preferences), list the models on a thread, so the panel's model
    menu and first-run steps know what is installed without anyone pressing Refresh. A Python whose listing
    failed is not tried again until the setting changes (the error shows in the Models box and the panel).
    Returns the seconds until the next look, or None once a listing has succeeded."""
    global _listed_with, _listing
    if _listing is not None and not _listing.is_alive():  # a listing ended: show what it found
        _listing = None
        redraw_areas(bpy.context, {"PREFERENCES", "PROPERTIES", "VIEW_3D"})
    if model_list.has_listed():
        return None
    python = interpreter_path(get_preferences())
    if _listing is None and python != _listed_with and backend_command.interpreter_error(python) is None:
        _listed_with = python
        try:
            _listing = model_list.refresh_in_background(*_list_command())
        except model_list.ModelCommandError:
            pass  # the preferences changed in between: the next look tries again
    return _WATCH_S


class SYNCSPHERE_OT_refresh_models(Operator):
    """List the installed models again: the Hugging Face cache and the Model Folder"""

    bl_idname = "syncsphere.refresh_models"
    bl_label = "Refresh Models"
    bl_options = {"REGISTER"}

    def execute(self, context):
        """Run ``models list`` (blocking, bounded by a timeout) and report a failure in one sentence."""
        problem = refresh_models(context)
        redraw_areas(context, {"PREFERENCES", "PROPERTIES", "VIEW_3D"})
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        return {"FINISHED"}


def follow_download():
    """The UI's timer (``bpy.app.timers``) while a download runs: take in its progress and redraw the
    preferences; once it has ended, list the models again. Returns the seconds until the next call, or None
    (stop) when it has ended.

    A timer rather than a modal operator: a modal operator belongs to a window, and closing the Preferences
    window (where the download is started) would end it, and the download with it.
    """
    download = model_list.current_download()
    if download is None:
        return None
    finished = download.poll()
    if finished and download.state == "done":
        refresh_models(bpy.context)
    # The panel's first-run steps show the progress too (panels/first_run.py).
    redraw_areas(bpy.context, {"PREFERENCES", "PROPERTIES", "VIEW_3D"})
    return None if finished else _TIMER_S


class SYNCSPHERE_OT_download_model(Operator):
    """Download a model from the Hugging Face hub into the model cache (only the files SyncSphere loads)"""

    bl_idname = "syncsphere.download_model"
    bl_label = "Download Model"
    bl_options = {"REGISTER"}

    model_id: StringProperty(name="Model", default="",
                             description="Hub id to download; empty: the one typed in the preferences")

    @classmethod
    def poll(cls, context):
        """One download at a time."""
        if model_list.is_downloading():
            cls.poll_message_set("A model is downloading; cancel it or wait until it has finished")
            return False
        return True

    def execute(self, context):
        """Start the download; in background mode wait for it and report, else follow it from a timer (the
        Models box shows its progress and how it ended)."""
        prefs = get_preferences(context)
        model_id = (self.model_id or (prefs.download_id if prefs is not None else "")).strip()
        if not model_id:
            self.report({"ERROR"}, f"Type the hub id of the model to download, like {model_list.DEFAULT_MODEL}")
            return {"CANCELLED"}
        if not setup.online_access():
            self.report({"ERROR"}, "Downloading a model needs Blender's online access: allow it in Preferences > "
                                   "System > Network > Allow Online Access, or put the model in your Model Folder")
            return {"CANCELLED"}
        try:
            python, env = _backend(context)
            arguments = model_list.download_arguments(model_id, prefs.download_fp16)
            download = model_list.start_download(backend_command.backend_command(python, *arguments), env,
                                                 backend_command.EXTENSION_DIR, model_id)
        except model_list.ModelCommandError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if not bpy.app.background:
            if not bpy.app.timers.is_registered(follow_download):  # it follows whichever download is current
                bpy.app.timers.register(follow_download, first_interval=_TIMER_S, persistent=True)
            self.report({"INFO"}, f"Downloading {model_id}: its progress shows in SyncSphere's panel and preferences")
            return {"FINISHED"}
        # No event loop (scripts, tests): wait, printing the progress as it changes.
        download.wait(on_progress=lambda running: print(running.status_text(), flush=True))
        if download.state == "cancelled":
            self.report({"WARNING"}, download.status_text())
            return {"CANCELLED"}
        if download.state != "done":
            self.report({"ERROR"}, download.error)
            return {"CANCELLED"}
        problem = refresh_models(context)
        self.report({"WARNING"} if problem else {"INFO"}, problem or download.status_text())
        return {"FINISHED"}


class SYNCSPHERE_OT_cancel_model_download(Operator):
    """Stop the running model download; the files fetched so far are kept, so downloading again resumes"""

    bl_idname = "syncsphere.cancel_model_download"
    bl_label = "Cancel Download"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        """Only while a download runs."""
        return model_list.is_downloading()

    def execute(self, context):
        """Stop the download process; the Models box then says it was cancelled."""
        model_list.current_download().cancel()
        redraw_areas(context, {"PREFERENCES"})
        return {"FINISHED"}


class SYNCSPHERE_OT_remove_model(Operator):
    """Delete this model from the Hugging Face cache to free its disk space (downloading it again is possible)"""

    bl_idname = "syncsphere.remove_model"
    bl_label = "Remove Model"
    bl_options = {"REGISTER"}

    model_id: StringProperty(name="Model", description="Hub id of the cached model to delete")

    def invoke(self, context, event):
        """Ask first: the files are deleted from the disk."""
        return context.window_manager.invoke_confirm(self, event, title="Remove Model",
                                                     message=f"Delete {self.model_id} from the model cache?",
                                                     confirm_text="Remove", icon="WARNING")

    def execute(self, context):
        """Run ``models remove`` (the backend refuses local folders and files) and list the models again."""
        download = model_list.current_download()
        if model_list.is_downloading() and download.model_id == self.model_id:
            self.report({"ERROR"}, f"{self.model_id} is downloading; cancel the download before removing it")
            return {"CANCELLED"}
        try:
            python, env = _backend(context)
            command = backend_command.backend_command(python, *model_list.remove_arguments(self.model_id))
            message = model_list.remove_installed(command, env, backend_command.EXTENSION_DIR)
        except model_list.ModelCommandError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        problem = refresh_models(context)
        self.report({"WARNING"} if problem else {"INFO"}, problem or message)
        return {"FINISHED"}


class SYNCSPHERE_OT_set_default_model(Operator):
    """Make this model the one Generate uses (the preferences' Default Model)"""

    bl_idname = "syncsphere.set_default_model"
    bl_label = "Set as Default"
    bl_options = {"REGISTER"}

    model_id: StringProperty(name="Model", description="Hub id or path of the model")

    def execute(self, context):
        """Set Default Model and mark the preferences changed, so auto-save keeps it."""
        prefs = get_preferences(context)
        if prefs is None:
            self.report({"ERROR"}, "SyncSphere's preferences are not available: enable the add-on first")
            return {"CANCELLED"}
        prefs.default_model = self.model_id
        context.preferences.is_dirty = True  # a change made by an operator does not mark them by itself
        redraw_areas(context, {"PREFERENCES", "PROPERTIES", "VIEW_3D"})
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_refresh_models, SYNCSPHERE_OT_download_model, SYNCSPHERE_OT_cancel_model_download,
           SYNCSPHERE_OT_remove_model, SYNCSPHERE_OT_set_default_model)


def register():
    """Register the operators and list the models once a backend Python is set (timers never fire in background
    mode)."""
    for cls in classes:
        bpy.utils.register_class(cls)
    if not bpy.app.timers.is_registered(list_when_a_backend_is_set):
        bpy.app.timers.register(list_when_a_backend_is_set, first_interval=1.0, persistent=True)


def unregister():
    """Cancel a running download, drop the timers, and unregister the operators."""
    if model_list.is_downloading():
        model_list.current_download().cancel()
    for timer in (list_when_a_backend_is_set, follow_download):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
