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
from ...backend.request import GenerateRequest, check_upscaled_size
from .generation import CUSTOM_SIZE, MAX_PIXELS, MAX_SIDE_PX, SIZE_STEP_PX
from .image_input import START_FROM_FILE, START_FROM_NOISE, START_FROM_WORLD
from .model_list import looks_like_path
from .panel_words import ADVANCED, BACKEND, PREFERENCES, in_panel_words


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


# Start from Image and Upscale hand the backend a file by its path: only a backend on this computer can read it.
NEEDS_LOCAL_BACKEND = ("Start from Image and Upscale need Backend = Local in the SyncSphere Preferences: the backend "
                       "reads the image from this computer's disk")
# Extend Photo hands the backend the photo by its path, as Start from Image does.
PHOTO_NEEDS_LOCAL_BACKEND = ("Extend Photo needs Backend = Local in the SyncSphere Preferences: the backend reads "
                             "the photo from this computer's disk")
# Start from Image = World's Image, and the scene's World shows no image.
NO_WORLD_IMAGE = ("The scene's World has no image to start from (no Environment Texture node with an image); set "
                  "Start from Image to File and choose one")


def custom_size_problem(settings, window_px):
    """Why the Size menu's Custom size (``settings.custom_width`` x ``settings.custom_height`` px, for
    ``settings.mode``) cannot be generated, in one sentence, or None (also None when Size is a preset). The
    backend's rules, checked before any job: each side a multiple of SIZE_STEP_PX (the VAE factor), at least one
    view in each direction (``window_px``, the model's view, or Advanced › Window x SIZE_STEP_PX when set), at most
    MAX_SIDE_PX a side and MAX_PIXELS in all (8192x4096), and a 360° World twice as wide as tall."""
    if settings.resolution != CUSTOM_SIZE:
        return None
    width, height = int(settings.custom_width), int(settings.custom_height)
    for name, value in (("Width", width), ("Height", height)):
        if value % SIZE_STEP_PX:
            return (f"The custom {name} {value} px is not a multiple of {SIZE_STEP_PX} px, the model's VAE factor; "
                    f"try {max(SIZE_STEP_PX, value // SIZE_STEP_PX * SIZE_STEP_PX)}")
    if max(width, height) > MAX_SIDE_PX or width * height > MAX_PIXELS:
        return (f"The custom size {width}x{height} px is larger than SyncSphere makes (at most {MAX_SIDE_PX} px a "
                f"side and {MAX_SIDE_PX}x{MAX_PIXELS // MAX_SIDE_PX} px in all); make Width or Height smaller")
    view = int(settings.window) * SIZE_STEP_PX if settings.window else int(window_px)
    if min(width, height) < view:
        return (f"The custom size {width}x{height} px is smaller than one view of {view} px; make Width and Height "
                f"at least {view} px or set a smaller {ADVANCED}Window")
    if settings.mode == "WORLD" and width != 2 * height:
        return (f"A 360° World is twice as wide as it is tall, but the custom size is {width}x{height} px; set "
                f"Height to {width // 2} px")
    return None


def start_image_problem(source, path, local):
    """Why Start from Image cannot be used, in one sentence, or None (also None when it is off). ``source``: the
    setting's choice (START_FROM_NOISE, START_FROM_FILE, START_FROM_WORLD); ``path``: Image File as Blender
    resolved it (absolute); ``local``: whether the backend runs on this computer (NEEDS_LOCAL_BACKEND otherwise).
    A blank or missing file is refused here; a World without an image is refused by the operator, which reads the
    World (NO_WORLD_IMAGE)."""
    if source == START_FROM_NOISE:
        return None
    if not local:
        return NEEDS_LOCAL_BACKEND
    if source == START_FROM_FILE:
        path = path.strip()
        if not path:
            return "Choose the image to start from in Image File, or set Start from Image to None"
        if not os.path.isfile(path):
            return f"The start image {path} does not exist; choose another in Image File"
    elif source != START_FROM_WORLD:
        return f"Unknown Start from Image choice {source}"
    return None


def photo_problem(enabled, mode, path, local):
    """Why Extend Photo cannot be used, in one sentence, or None (also None when it is off or the mode is not
    WORLD, where nothing of it is sent). ``path``: Photo File as Blender resolved it (absolute); ``local``: whether
    the backend runs on this computer (PHOTO_NEEDS_LOCAL_BACKEND otherwise). A blank or missing file is refused."""
    if not enabled or mode != "WORLD":
        return None
    if not local:
        return PHOTO_NEEDS_LOCAL_BACKEND
    path = path.strip()
    if not path:
        return "Choose the photo to extend in Photo File, or turn Extend Photo off"
    if not os.path.isfile(path):
        return f"The photo {path} does not exist; choose another in Photo File"
    return None


def upscale_problem(png_path, size, scale, local):
    """Why a history item's image (``png_path``, of ``size`` (width, height) or None when it cannot be read) cannot
    be upscaled ``scale`` times, in one sentence, or None: the backend must be local (NEEDS_LOCAL_BACKEND), the
    file must still be there, and the result at most 8192x4096 px (the backend's ``check_upscaled_size``)."""
    if not local:
        return NEEDS_LOCAL_BACKEND
    if size is None:
        return f"The image of this generation is gone or unreadable ({png_path}), so it cannot be upscaled"
    try:
        check_upscaled_size(size[0] * scale, size[1] * scale)
    except BadRequest as error:
        return in_panel_words(str(error)).rstrip(".")
    return None
