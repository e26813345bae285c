"""Generate (a batch of variations, after the checks before a job), cancel, the Style menu, and the history and world
operators. Thin: the work is in ``blender_addon``."""

import os
import tempfile

import bpy
from bpy.props import EnumProperty, IntProperty
from bpy.types import Operator

from ..blender_addon.core import (backend_command, generation, image_input, model_list, preflight, server_client,
                                  session)
from ..blender_addon.core.names import prompt_title
from ..blender_addon.scene.preferences import (get_preferences, interpreter_path, output_folder, remote_backend,
                                               user_folder)
from ..blender_addon.scene import preview, world
from ..blender_addon.scene.properties import STYLE_ITEMS
from ..blender_addon.scene.results import (add_history, apply_result, generation_title, history_values,
                                           result_problem, reuse_settings)


def redraw_areas(context, area_types):
    """Ask every area of the given types (e.g. {"PROPERTIES", "VIEW_3D"}) in every window to redraw."""
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in area_types:
                area.tag_redraw()


class JobRunner:
    """What Generate and Upscale share (a mixin of their operators): start the jobs a subclass's ``prepare`` makes
    after its checks, follow them (synchronously in background mode, else from a modal timer), record each in the
    History and apply it (``finish_job``), and report how the batch ended. A subclass defines ``prepare(context,
    settings, prefs, python)`` -> (worker, runs, problem) and ``begin(context, settings, runs)``, which sets
    ``values`` (what the History records), ``mode`` (how results are applied), ``title`` (None: after the prompt)
    and ``made``."""

    @classmethod
    def poll(cls, context):
        return not session.is_busy()

    def execute(self, context):
        """Check everything that can be checked before a job starts, then start the batch of variations; in
        background mode wait for it, else follow it from a modal timer."""
        settings = context.scene.syncsphere
        prefs = get_preferences(context)
        python = interpreter_path(prefs)
        worker, runs, problem = self.prepare(context, settings, prefs, python)
        if problem:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        self.begin(context, settings, runs)
        batch = session.start_batch(worker, runs, hang_timeout_s=prefs.timeout_s)
        if bpy.app.background or context.window is None:
            while True:  # no event loop: scripts and tests get the results synchronously
                batch.job.wait()
                self.finish_job(context, batch.job)
                if batch.start_next() is None:
                    return self.finish_batch(context, batch)
        self._timer = context.window_manager.event_timer_add(0.25, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        """Follow the batch on each timer tick: handle each job as it ends and start the next; finish at the end."""
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        batch = session.current_batch()
        batch.job.poll()
        preview.follow_job(context, batch.job)  # a new preview into the panel (and the World); the World back at the end
        redraw_areas(context, {"PROPERTIES", "VIEW_3D"})
        if not batch.job.finished:
            return {"PASS_THROUGH"}
        self.finish_job(context, batch.job)
        if batch.start_next() is not None:
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        return self.finish_batch(context, batch)

    def finish_job(self, context, job):
        """A job of the batch ended: when it is done, record it in the history (named after the prompt) and
        apply it; a cancelled or failed job is reported by ``finish_batch``."""
        if job.state != "done":
            return
        settings = context.scene.syncsphere
        item = add_history(settings, job.params["seed"], job.outputs, values=self.values,
                           title=self.title and generation_title(settings, "", self.title))
        self.made.append(item.seed)
        try:
            message = apply_result(context, settings, self.mode, job.outputs, item.title)
        except ValueError as error:
            self.report({"WARNING"}, str(error))
            return
        # A modal operator gets no automatic undo step: push one, so Ctrl+Z takes the result back out.
        bpy.ops.ed.undo_push(message="SyncSphere: apply generation")
        self.report({"INFO"}, message)
        for warning in generation.result_warnings(job.outputs.get("metadata")):
            self.report({"WARNING"}, warning)

    def finish_batch(self, context, batch):
        """Report how the batch ended (all made, cancelled or failed, and how many were made before) and stop
        the worker unless it is kept warm."""
        if not get_preferences(context).keep_warm:
            batch.worker.stop()
        made = len(self.made)
        kept = f"; the {made} made before are in the History" if made else ""
        job = batch.job
        if job.state == "cancelled" or batch.cancelled and made < batch.count:
            self.report({"INFO"}, f"Generation cancelled{kept}" if made else "Generation cancelled; the scene is unchanged")
            return {"CANCELLED"}
        if job.state == "error":
            where = f"Variation {batch.started} of {batch.count} failed: " if batch.count > 1 else ""
            self.report({"ERROR"}, where + job.error + kept)
            return {"CANCELLED"}
        if batch.count > 1:
            self.report({"INFO"}, f"Made {made} variations (seeds {', '.join(map(str, self.made))}); "
                                  "each is in the History")
        return {"FINISHED"}


class SYNCSPHERE_OT_generate(JobRunner, Operator):
    """Generate with the backend and put the result into the scene; with Variations above 1, that many images,
    one after another, each into the History"""

    bl_idname = "syncsphere.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    def begin(self, context, settings, runs):
        """Remember, as pressed, what each job records in the history and how its result is applied (the panel may
        change while a batch runs), and show the seed used, random or not."""
        settings.seed = runs[0][0]
        self.values, self.mode, self.title, self.made = history_values(settings), settings.mode, None, []

    @staticmethod
    def prepare(context, settings, prefs, python):
        """(worker, runs, None) for a batch that can start: runs are (seed, params, out_dir), one per variation;
        else (None, None, the first problem in one sentence). Nothing is started and no process spawned before
        every check has passed: the prompt, the backend (``check_backend``), a custom size, the start image, and
        the backend's own checks of the params."""
        if not settings.prompt.strip():
            return None, None, "Type a prompt first: it describes what to generate"
        remote, out_root, log_path, problem = check_backend(context, settings.mode, prefs, python)
        if problem:
            return None, None, problem
        window_px = model_list.native_window_px(prefs.default_model, model_list.cached_models())
        start_path = bpy.path.abspath(settings.start_image_path) if settings.start_image_path.strip() else ""
        photo_path = bpy.path.abspath(settings.photo_path) if settings.photo_path.strip() else ""
        problem = (preflight.custom_size_problem(settings, window_px)
                   or preflight.start_image_problem(settings.start_image_source, start_path, remote is None)
                   or preflight.photo_problem(settings.extend_photo, settings.mode, photo_path, remote is None))
        if problem:
            return None, None, problem
        init_image = None
        if settings.start_image_source == image_input.START_FROM_FILE:
            init_image = os.path.abspath(start_path)
        elif settings.start_image_source == image_input.START_FROM_WORLD:
            # Saved for the backend when it is packed, generated or edited; the user's image is only read.
            init_image = world.world_image_file(context.scene.world, tempfile.mkdtemp(prefix="syncsphere-start-"))
            if init_image is None:
                return None, None, preflight.NO_WORLD_IMAGE
        photo = os.path.abspath(photo_path) if settings.extend_photo and settings.mode == "WORLD" else None
        device = prefs.device if settings.device == "PREFERENCES" else settings.device
        runs = []
        for seed in generation.variation_seeds(settings, settings.variations):
            params = generation.generate_params(settings, seed, model=prefs.default_model, device=device,
                                                window_px=window_px, init_image=init_image, photo=photo)
            runs.append((seed, params, generation.job_folder(out_root, settings.prompt, seed)))
        problem = preflight.request_problem(runs[0][1], runs[0][2])  # the seeds alone differ
        if problem:
            return None, None, problem
        return make_worker(prefs, python, remote, log_path), runs, None


def check_backend(context, mode, prefs, python):
    """The checks before any job, generation or upscale, of a result of ``mode``: the backend (the Python, the SSH
    host or the server, and Blender's online access for a remote one), a mesh for a tileable texture, a writable
    output folder, and the model (when the last models listing can tell). Returns (remote, output root, log path,
    None), or (None, None, None, the first problem in one sentence); ``remote``: the preferences'
    ``remote_backend`` (None: local)."""
    remote = remote_backend(prefs)  # Backend = SSH: the GPU machine; Server: the shared server; else None
    server = isinstance(remote, server_client.ServerBackend)
    if remote is not None and not bpy.app.online_access:
        return None, None, None, (server_client.SERVER_NEEDS_ONLINE_ACCESS if server
                                  else backend_command.SSH_NEEDS_ONLINE_ACCESS)
    problem = ((remote.problem() if remote is not None else backend_command.interpreter_error(python))
               or result_problem(context, mode))
    if problem:
        return None, None, None, problem
    try:
        out_root, log_path = output_folder(prefs), os.path.join(user_folder("logs"), "backend.log")
    except ValueError as error:
        return None, None, None, str(error)
    # The models listing is of this machine's cache: it says nothing of a remote backend's.
    listed = model_list.has_listed() and not model_list.listing_error() and remote is None
    problem = (preflight.output_folder_problem(out_root)
               or (remote is None and preflight.model_problem(prefs.default_model, model_list.cached_models(),
                                                              listed, bpy.app.online_access)))
    if problem:
        return None, None, None, problem
    return remote, out_root, log_path, None


def make_worker(prefs, python, remote, log_path):
    """The shared worker (``session.get_worker``) for the preferences' backend: a local process with ``python``, the
    ssh command of ``remote``, or the server's client."""
    if isinstance(remote, server_client.ServerBackend):  # no process here: the server runs the jobs
        command, env = None, None
    elif remote is not None:  # ssh gets Blender's environment as it is (its agent socket included)
        command, env = remote.command(allow_network=bpy.app.online_access), None
    else:
        command = backend_command.backend_command(python)
        env = backend_command.backend_environment(allow_network=bpy.app.online_access)
    return session.get_worker(command, env, backend_command.EXTENSION_DIR, log_path, remote)


class SYNCSPHERE_OT_history_upscale(JobRunner, Operator):
    """Upscale this generation 2 or 4 times (at most 8192x4096 px): its image re-drawn at the larger size with the
    same views, into the History and the scene as a new result; the original stays"""

    bl_idname = "syncsphere.history_upscale"
    bl_label = "Upscale"
    bl_options = {"REGISTER"}

    index: IntProperty(default=0)
    scale: IntProperty(name="Scale", default=2, min=2, max=4)

    def prepare(self, context, settings, prefs, python):
        """(worker, [(seed, params, out_dir)], None) for the upscale job of the history item (``image_input.
        upscale_params``: its settings and seed, the panel's Window, Stride, Memory and Device), or (None, None,
        the first problem): the checks of Generate's backend (``check_backend``), the item's image (there, and
        at most 8192x4096 px upscaled: ``preflight.upscale_problem``) and the backend's checks of the params."""
        item = history_item(context, self.index)
        if item is None:
            return None, None, "There is no such generation in the History"
        if self.scale not in image_input.UPSCALE_FACTORS:
            return None, None, f"Upscale is x2 or x4, not x{self.scale}"
        remote, out_root, log_path, problem = check_backend(context, item.mode, prefs, python)
        if problem:
            return None, None, problem
        size = image_input.png_size(item.png_path)
        problem = preflight.upscale_problem(item.png_path, size, self.scale, remote is None)
        if problem:
            return None, None, problem
        values = dict(history_values(item), seed=item.seed)
        device = prefs.device if settings.device == "PREFERENCES" else settings.device
        params = image_input.upscale_params(values, os.path.abspath(item.png_path), size, self.scale, settings,
                                            model=prefs.default_model, device=device)
        out_dir = generation.job_folder(out_root, item.prompt, item.seed)
        problem = preflight.request_problem(params, out_dir)
        if problem:
            return None, None, problem
        return make_worker(prefs, python, remote, log_path), [(item.seed, params, out_dir)], None

    def begin(self, context, settings, runs):
        """The upscale records the item's settings, is applied as the item's mode, and is titled after it ("Harbour
        At Dusk x2")."""
        item = history_item(context, self.index)
        self.values, self.mode, self.made = history_values(item), item.mode, []
        self.title = f"{item.title or prompt_title(item.prompt)} x{self.scale}"


class SYNCSPHERE_OT_cancel(Operator):
    """Stop the running generation before its next step, and the variations not started yet"""

    bl_idname = "syncsphere.cancel"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return session.is_busy()

    def execute(self, context):
        """Ask the backend to stop the current job; the rest of the batch never starts."""
        session.cancel()
        return {"FINISHED"}


class SYNCSPHERE_OT_apply_style(Operator):
    """Fill Style Prompt and Avoid with a style preset's words; edit them afterwards as you like"""

    bl_idname = "syncsphere.apply_style"
    bl_label = "Style"
    bl_options = {"REGISTER", "UNDO"}
    bl_property = "style"

    style: EnumProperty(name="Style", items=STYLE_ITEMS)

    def execute(self, context):
        """Set the scene's style and its two texts (generation.STYLES)."""
        settings = context.scene.syncsphere
        settings.style = self.style
        settings.style_prompt, settings.negative_prompt = generation.STYLE_TEXTS[self.style]
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
            # Items from before titles existed are named after their prompt.
            message = apply_result(context, context.scene.syncsphere, item.mode, {"png": item.png_path, "exr": item.exr_path},
                                   item.title or prompt_title(item.prompt))
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


classes = (SYNCSPHERE_OT_generate, SYNCSPHERE_OT_cancel, SYNCSPHERE_OT_apply_style, SYNCSPHERE_OT_history_apply,
           SYNCSPHERE_OT_history_reuse, SYNCSPHERE_OT_history_upscale, SYNCSPHERE_OT_restore_world)
