"""The first-run box, drawn at the top of the main panel: what to do before Generate works.

Thin: ``blender_addon/core/first_run.py`` decides the steps (the backend, then the model with its size and the
download's progress, then Generate) from the preferences and the models list; this draws them and their
buttons, which are the operators the preferences use (Set Up Backend, Download, Cancel, Refresh).
"""

import bpy

from ..blender_addon.core import first_run, model_list
from ..blender_addon.scene.preferences import (ADDON_PACKAGE, draw_sentence, get_preferences, interpreter_path,
                                               remote_backend)

# Blender's labels do not wrap: sentences are wrapped to about as many characters as the region is wide.
# A character of the UI font is about this many pixels wide at a resolution scale of 1.
_CHARACTER_PX = 7
# Characters per line where the region's width is not known (headless Blender draws without one).
_DEFAULT_WIDTH = 60


def draw_first_run(layout, context):
    """Draw the steps still to do before Generate works, each with its buttons and, for a download, its
    progress bar; draws nothing once the backend and the model are in place."""
    prefs = get_preferences(context)
    if prefs is None or remote_backend(prefs) is not None:  # SSH or Server: set up on the GPU machine (docs/running.md)
        return
    steps = first_run.first_run_steps(
        python=interpreter_path(prefs), online=bpy.app.online_access, listed=model_list.has_listed(),
        listing_error=model_list.listing_error(), models=model_list.cached_models(), model=prefs.default_model,
        download=model_list.current_download(), fp16=prefs.download_fp16, addon_module=ADDON_PACKAGE)
    if not steps:
        return
    width = _sentence_width(context)
    box = layout.box()
    for step in steps:
        column = box.column()
        column.enabled = step.enabled  # a later step shows what comes, greyed, until the earlier one is done
        column.label(text=step.title, icon="LAYER_ACTIVE" if step.enabled else "LAYER_USED")
        draw_sentence(column, step.text, "BLANK1", width)
        if step.problem:
            draw_sentence(column, step.problem, "ERROR", width)
        if step.progress is not None:
            column.progress(factor=step.progress, text=step.progress_text)
        if step.actions:
            row = column.row(align=True)
            for action in step.actions:
                properties = row.operator(action.operator, text=action.text, icon=action.icon)
                for name, value in action.properties:
                    setattr(properties, name, value)


def _sentence_width(context):
    """Characters per label line for the region being drawn."""
    region = getattr(context, "region", None)
    if region is None or region.width <= 0:
        return _DEFAULT_WIDTH
    return max(20, int(region.width / (_CHARACTER_PX * context.preferences.system.ui_scale)))
