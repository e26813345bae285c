"""The checks Generate makes before anything is sent, as plain Python (no bpy), tested without Blender.

A job that cannot succeed is refused before the backend starts, not minutes later: every check here reads only
what the add-on already knows (the settings' params, the output folder, the last models listing). Each returns
None or one sentence in the panel's words (``panel_words``). The checks that need Blender's data (a mesh to put a
texture on) are in ``blender_addon/scene/results.py`` and the Generate operator runs them all
(``operators/generate.py``).
"""

import os
import tempfile

from ...backend.errors import BadRequest
from ...backend.request import GenerateRequest
from .model_list import looks_like_path
from .panel_words import BACKEND, PREFERENCES, in_panel_words


def request_problem(params, out_dir):
    """Why the backend would refuse the generate ``params`` into ``out_dir`` before loading a model, in the
    panel's words, or None: the backend's own validation (``GenerateRequest.validated``, standard library only,
    shipped in the extension), run here so the worker is never started for it."""
    try:
        GenerateRequest.from_params({**params, "out": out_dir}).validated()
    except BadRequest as error:
        return in_panel_words(str(error))
    return None


def output_folder_problem(folder):
    """Why generated files cannot go into ``folder`` (an absolute path), or None. Creates the folder when it is
    missing (as the first job would) and writes and removes a probe file in it, so the answer is the file
    system's, permissions, read-only disks and a file in the way included."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        return (f"The output folder {folder} cannot be written ({reason}); choose another in "
                f"{PREFERENCES}Output Folder")
    return None


def model_problem(model, installed, listed, online):
    """Why the model ``model`` (the preferences' Default Model: a hub id or a local path) cannot be loaded, or
    None when it can or it cannot be told.

    installed: the last listing's models (``model_list.InstalledModel``); listed: whether a listing succeeded
    (otherwise nothing is known about the cache); online: Blender's online access (the backend downloads a hub
    model it lacks only with it). A blank model, a local path that does not exist, and a hub id that is not
    completely installed while online access is off are refused.
    """
    model = model.strip()
    if not model:
        return f"No model is chosen; pick one in {BACKEND}Model"
    if looks_like_path(model):
        if not os.path.exists(os.path.expanduser(model)):
            return f"The model {model} does not exist; pick another in {BACKEND}Model"
        return None
    if not listed or online:
        return None
    if any(entry.id == model and entry.complete for entry in installed):
        return None
    return (f"The model {model} is not installed and Blender's online access is off: download it in "
            f"{PREFERENCES}Models, turn on Allow Online Access (Preferences › System › Network), or pick an "
            f"installed one in {BACKEND}Model")
