"""Generate, cancel, and the history and world operators. Thin: the work is in ``blender_addon``."""

import os

import bpy
from bpy.props import IntProperty
from bpy.types import Operator

from ..blender_addon.core import backend_command, generation, session
from ..blender_addon.scene.preferences import get_preferences, interpreter_path, output_folder, user_folder
from ..blender_addon.scene import world
from ..blender_addon.scene.results import add_history, apply_result, reuse_settings


def redraw_areas(context, area_types):
    """Ask every area of the given types (e.g. {"PROPERTIES", "VIEW_3D"}) in every window to redraw."""
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in area_types:
                area.tag_redraw()


class SYNCSPHERE_OT_generate(Operator):
    """Generate with the backend and put the result into the scene"""

    bl_idname = "syncsphere.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return not session.is_busy()

    def execute(self, context):
        """Start the job; in background mode wait for it, else follow it from a modal timer."""
        settings = context.scene.syncsphere
        prefs = get_preferences(context)
        if not settings.prompt.strip():
            self.report({"ERROR"}, "Type a prompt first: it describes what to generate")
            return {"CANCELLED"}
        python = interpreter_path(prefs)
        problem = backend_command.interpreter_error(python)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        try:
            out_root, log_path = output_folder(prefs), os.path.join(user_folder("logs"), "backend.log")
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}

        self.seed = generation.pick_seed(settings)
        settings.seed = self.seed
        self.mode = settings.mode
        device = prefs.device if settings.device == "PREFERENCES" else settings.device
        params = generation.generate_params(settings, self.seed, model=prefs.default_model, device=device)
        worker = session.get_worker(
            backend_command.backend_command(python),
            backend_command.backend_environment(allow_network=bpy.app.online_access),
            backend_command.EXTENSION_DIR,
            log_path,
        )
        out_dir = generation.job_folder(out_root, settings.prompt, self.seed)
        job = session.start_job(worker, params, out_dir, hang_timeout_s=prefs.timeout_s)
        if bpy.app.background or context.window is None:
            job.wait()  # no event loop: scripts and tests get the result synchronously
            return self.finish(context, job)
        self._timer = context.window_manager.event_timer_add(0.25, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        """Follow the job on each timer tick; finish when it ends."""
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        job = session.current_job()
        job.poll()
        redraw_areas(context, {"PROPERTIES", "VIEW_3D"})
        if not job.finished:
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        return self.finish(context, job)

    def finish(self, context, job):
        """Report how the job ended; on success record it in the history and apply it."""
        prefs = get_preferences(context)
        if not prefs.keep_warm:
            job.worker.stop()
        if job.state == "cancelled":
            self.report({"INFO"}, "Generation cancelled; the scene is unchanged")
            return {"CANCELLED"}
        if job.state == "error":
            self.report({"ERROR"}, job.error)
            return {"CANCELLED"}
        settings = context.scene.syncsphere
        add_history(settings, self.seed, job.outputs)
        try:
            message = apply_result(context, settings, self.mode, job.outputs)
        except ValueError as error:
            self.report({"WARNING"}, str(error))
            return {"FINISHED"}
        # A modal operator gets no automatic undo step: push one, so Ctrl+Z takes the result back out.
        bpy.ops.ed.undo_push(message="SyncSphere: apply generation")
        self.report({"INFO"}, message)
        for warning in generation.result_warnings(job.outputs.get("metadata")):
            self.report({"WARNING"}, warning)
        return {"FINISHED"}


class SYNCSPHERE_OT_cancel(Operator):
    """Stop the running generation before its next step"""

    bl_idname = "syncsphere.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return session.is_busy()

    def execute(self, context):
        """Ask the backend to stop the current job."""
        session.current_job().cancel()
        return {"FINISHED"}


def history_item(context, index):
    """The scene's history item at ``index``, or None when there is none."""
    history = context.scene.syncsphere.history
    return history[index] if 0 <= index < len(history) else None


class SYNCSPHERE_OT_history_apply(Operator):
    """Put this past generation into the scene again"""

    bl_idname = "syncsphere.history_apply"
    bl_label = "Apply"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(default=0)

    def execute(self, context):
        """Apply the history item's files, as when it was generated."""
        item = history_item(context, self.index)
        if item is None:
            return {"CANCELLED"}
        if not os.path.isfile(item.exr_path):
            self.report({"ERROR"}, f"The files of this generation are gone ({item.exr_path})")
            return {"CANCELLED"}
        try:
            message = apply_result(context, context.scene.syncsphere, item.mode, {"png": item.png_path, "exr": item.exr_path})
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, message)
        return {"FINISHED"}


class SYNCSPHERE_OT_history_reuse(Operator):
    """Copy this generation's prompt, seed and settings back, to vary or repeat it"""

    bl_idname = "syncsphere.history_reuse"
    bl_label = "Reuse Settings"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(default=0)

    def execute(self, context):
        """Copy the item's settings into the scene settings."""
        item = history_item(context, self.index)
        if item is None:
            return {"CANCELLED"}
        reuse_settings(context.scene.syncsphere, item)
        return {"FINISHED"}


class SYNCSPHERE_OT_restore_world(Operator):
    """Give the scene back the World it had before SyncSphere replaced it"""

    bl_idname = "syncsphere.restore_world"
    bl_label = "Restore Previous World"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        """Restore the remembered World if it still exists."""
        if not world.restore_previous_world(context):
            self.report({"WARNING"}, "There is no previous World to restore")
            return {"CANCELLED"}
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_generate, SYNCSPHERE_OT_cancel, SYNCSPHERE_OT_history_apply, SYNCSPHERE_OT_history_reuse,
           SYNCSPHERE_OT_restore_world)
