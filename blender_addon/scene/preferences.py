"""The add-on preferences: which Python runs the backend, which model, which device, where outputs go, and
the Models list (installed models, download, remove; the logic is in ``model_list``)."""

import os
import textwrap

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy.types import AddonPreferences

from ..core import model_list
from ..core.backend_command import RemoteBackend
from ..core.server_client import ServerBackend
from ..core.model_list import DEFAULT_MODEL

# Preferences belong to the add-on, whose package holds this one
# (``bl_ext.<repository>.syncsphere.blender_addon.scene`` -> ``bl_ext.<repository>.syncsphere``).
ADDON_PACKAGE = __package__.removesuffix(".blender_addon.scene")

# Sub-folder of the extension's user folder that holds generated images when no folder is chosen.
OUTPUTS_SUBFOLDER = "outputs"

# Characters per line of an error sentence in the preferences (a label does not wrap by itself).
SENTENCE_WIDTH = 90

# The icon next to how the last download ended.
DOWNLOAD_END_ICONS = {"done": "CHECKMARK", "cancelled": "INFO", "error": "ERROR"}

# The model menu's items as last handed to Blender. Blender keeps pointers to the strings of a dynamic
# enum's items without owning them: they must stay alive here, or menus show garbage or Blender crashes.
_menu_items = []


def default_model_menu_items(prefs, context=None):
    """The items of the model menu (``default_model_menu``): ``model_list.model_choices`` of the last listing
    and ``prefs.default_model``, as Blender's ``(identifier, name, description, number)`` tuples."""
    global _menu_items
    items = [(model_id, label, description, number) for number, (model_id, label, description)
             in enumerate(model_list.model_choices(model_list.cached_models(), prefs.default_model))]
    if items != _menu_items:  # equal items: hand back the same strings Blender already holds
        _menu_items = items
    return _menu_items


def _get_default_model_menu(prefs):
    """The menu shows Default Model: the number of its item (-1, no item, only when it is blank)."""
    return next((number for model_id, _, _, number in default_model_menu_items(prefs)
                 if model_id == prefs.default_model), -1)


def _set_default_model_menu(prefs, number):
    """Picking an item sets Default Model to its model."""
    for model_id, _, _, item_number in _menu_items:
        if item_number == number:
            prefs.default_model = model_id


class SyncSpherePreferences(AddonPreferences):
    """SyncSphere settings shared by every .blend file."""

    bl_idname = ADDON_PACKAGE

    backend_kind: EnumProperty(
        name="Backend",
        description="Where the backend runs",
        items=(
            ("LOCAL", "Local", "On this computer, with the Backend Python"),
            ("SSH", "SSH", "On another computer with a GPU, reached with ssh and your SSH keys (no port is opened); "
                           "the files of each job come back here"),
            ("SERVER", "Server", "A shared SyncSphere server (python -m backend serve --ray) at a URL, with its token; "
                                 "the files of each job come back here"),
        ),
        default="LOCAL",
    )
    ssh_host: StringProperty(name="SSH Host", description="The GPU machine, as ssh takes it: user@host or a Host "
                             "of ~/.ssh/config. ssh must log in without a password prompt (a key or an agent)", default="")
    ssh_options: StringProperty(name="SSH Options", description="More ssh arguments, as on a command line, like "
                                "-p 2222 -i ~/.ssh/gpu_key", default="")
    remote_python: StringProperty(name="Remote Python", description="The Python on the GPU machine that has torch "
                                  "and diffusers, like ~/syncsphere/.venv/bin/python", default="")
    remote_folder: StringProperty(name="Remote SyncSphere Folder", description="The SyncSphere folder on the GPU "
                                  "machine (the one that holds backend/), like ~/syncsphere", default="")
    remote_output_dir: StringProperty(name="Remote Output Folder", description="An absolute folder on the GPU "
                                      "machine that jobs write into before their files come back here", default="")
    remote_cache_dir: StringProperty(name="Remote Model Cache", description="The Hugging Face cache on the GPU "
                                     "machine (HF_HOME); empty: that machine's default", default="")
    server_url: StringProperty(name="Server URL", description="The shared server's address, like "
                               "https://gpu.studio:8443 (its TLS proxy), or http://127.0.0.1:8600 on this computer",
                               default="")
    # PASSWORD: drawn as dots and never shown in a tooltip or a report (server_client never logs it either).
    server_token: StringProperty(name="Server Token", description="The token the server's administrator gave you "
                                 "(or choose the file that holds it below)", subtype="PASSWORD", default="")
    server_token_file: StringProperty(name="Server Token File", description="A file that holds the server's token; "
                                      "used instead of Server Token when set", subtype="FILE_PATH", default="")
    python_path: StringProperty(
        name="Backend Python",
        description=("Python interpreter with torch and diffusers installed; SyncSphere runs "
                     "'python -m backend' with it, in its own process"),
        subtype="FILE_PATH",
        default="",
    )
    default_model: StringProperty(
        name="Default Model",
        description="Hugging Face model id or local folder of a Stable Diffusion model",
        default=DEFAULT_MODEL,
    )
    # Default Model as a menu of the installed models (the panel draws it). It has no value of its own, it
    # reads and writes default_model: the two never disagree, and a typed id or path is one of its items.
    default_model_menu: EnumProperty(
        name="Model",
        description="The model Generate uses: the default, the installed models (Refresh in SyncSphere's "
                    "preferences lists them) or the one typed in Default Model. Picking one sets Default Model",
        items=default_model_menu_items,
        get=_get_default_model_menu,
        set=_set_default_model_menu,
    )
    model_folder: StringProperty(
        name="Model Folder",
        description=("A folder of your own models (diffusers folders and .safetensors checkpoints), listed with "
                     "the installed models. SyncSphere never deletes anything in it"),
        subtype="DIR_PATH",
        default="",
    )
    download_id: StringProperty(
        name="Hub ID",
        description="The Hugging Face id of a model to download, like stabilityai/stable-diffusion-2-base",
        default="",
    )
    download_fp16: BoolProperty(
        name="fp16",
        description="Download the half-precision weights where the model has them (about half the size)",
        default=False,
    )
    device: EnumProperty(
        name="Device",
        description="Where the backend runs the model",
        items=(
            ("auto", "Automatic", "CUDA if available, then Apple Metal (MPS), then the CPU"),
            ("cuda", "CUDA", "An NVIDIA GPU"),
            ("mps", "Apple Metal", "An Apple Silicon GPU (MPS)"),
            ("cpu", "CPU", "The CPU (very slow, for testing)"),
        ),
        default="auto",
    )
    output_dir: StringProperty(
        name="Output Folder",
        description=("Folder for generated images; empty means the 'outputs' folder in "
                     "SyncSphere's user folder, which survives extension upgrades"),
        subtype="DIR_PATH",
        default="",
    )

    keep_warm: BoolProperty(
        name="Keep Backend Warm",
        description="Keep the backend running with the model loaded between generations (faster; holds GPU memory)",
        default=True,
    )

    timeout_s: IntProperty(
        name="Backend Timeout",
        description="Seconds a running job may go without any sign of life before the backend is declared hung and restarted",
        default=600,
        min=10,
    )

    def draw(self, context):
        """Draw the preferences in Preferences > Add-ons > SyncSphere."""
        draw_preferences(self.layout, self)


def draw_preferences(layout, prefs):
    """The backend settings with Set Up / Check Backend, then the Models box (``draw_models``)."""
    layout.use_property_split = True
    layout.prop(prefs, "backend_kind", expand=True)
    if prefs.backend_kind == "SSH":
        for name in ("ssh_host", "ssh_options", "remote_python", "remote_folder", "remote_output_dir", "remote_cache_dir"):
            layout.prop(prefs, name)
    elif prefs.backend_kind == "SERVER":
        for name in ("server_url", "server_token", "server_token_file"):
            layout.prop(prefs, name)
    else:
        layout.prop(prefs, "python_path")
    layout.prop(prefs, "default_model")
    layout.prop(prefs, "device")
    layout.prop(prefs, "output_dir")
    layout.prop(prefs, "keep_warm")
    layout.prop(prefs, "timeout_s")
    row = layout.row(align=True)
    row.operator("syncsphere.setup_backend", icon="IMPORT")
    row.operator("syncsphere.check_backend", icon="CONSOLE")
    draw_models(layout.box(), prefs)


def draw_sentence(layout, text, icon, width=SENTENCE_WIDTH):
    """Draw ``text`` (a sentence) as labels of at most ``width`` characters each, ``icon`` on the first."""
    # Not at hyphens: hub ids (stabilityai/stable-diffusion-2-base) stay whole on one line.
    for number, line in enumerate(textwrap.wrap(text, width, break_on_hyphens=False) or [""]):
        layout.label(text=line, icon=icon if number == 0 else "BLANK1")


def draw_models(layout, prefs):
    """The Models box: Refresh, the Model Folder, every installed model (name, size, family, state; Set as
    Default; Remove for cache entries, Resume for partial ones), and Download with its progress and Cancel."""
    layout.use_property_split = False
    header = layout.row()
    header.label(text="Models", icon="FILE_3D")
    header.operator("syncsphere.refresh_models", text="Refresh", icon="FILE_REFRESH")
    layout.prop(prefs, "model_folder")
    if model_list.listing_error():
        draw_sentence(layout, model_list.listing_error(), "ERROR")
    models = model_list.cached_models()
    if not model_list.has_listed():
        layout.label(text="Press Refresh to list the installed models", icon="INFO")
    elif not models:
        layout.label(text="No models installed yet: download one below, or set a Model Folder", icon="INFO")
    for model in models:
        row = layout.row()
        names = row.split(factor=0.5)
        is_default = model.id == prefs.default_model
        names.label(text=model.label, icon="CHECKMARK" if is_default else "BLANK1")
        names.label(text=model.summary())
        buttons = row.row(align=True)
        if model.removable and not model.complete:
            buttons.operator("syncsphere.download_model", text="Resume", icon="IMPORT").model_id = model.id
        default_button = buttons.row(align=True)
        default_button.enabled = not is_default
        default_button.operator("syncsphere.set_default_model", text="Set as Default").model_id = model.id
        if model.removable:  # only cache entries: a folder the user pointed at is never deleted
            buttons.operator("syncsphere.remove_model", text="", icon="TRASH").model_id = model.id

    row = layout.row(align=True)
    row.prop(prefs, "download_id")
    row.prop(prefs, "download_fp16", toggle=True)
    row.operator("syncsphere.download_model", text="Download", icon="IMPORT")
    download = model_list.current_download()
    if model_list.is_downloading():
        row = layout.row()
        row.progress(factor=download.fraction, text=download.status_text())
        row.operator("syncsphere.cancel_model_download", text="Cancel", icon="CANCEL")
    elif download is not None:  # how the last download ended
        draw_sentence(layout, download.status_text(), DOWNLOAD_END_ICONS[download.state])


def get_preferences(context=None):
    """Return SyncSphere's preferences, or None when the add-on is not enabled under its package name."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


def user_folder(subfolder):
    """Absolute path of ``subfolder`` in SyncSphere's user folder (created), which survives upgrades.

    Raises ValueError when the add-on is not installed as an extension (only extensions have one).
    """
    try:
        return bpy.utils.extension_path_user(ADDON_PACKAGE, path=subfolder, create=True)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"SyncSphere has no user folder ({error}); install it as an extension") from error


def output_folder(prefs):
    """Return the absolute folder generated images go to, creating the default one if needed.

    Raises ValueError when no folder is set and the add-on is not installed as an extension
    (only extensions have a user folder).
    """
    if prefs is not None and prefs.output_dir.strip():
        return bpy.path.abspath(prefs.output_dir)
    # Never inside the extension folder: Blender wipes it on every upgrade (docs/conventions.md#blender-rules).
    return user_folder(OUTPUTS_SUBFOLDER)


def model_folders(prefs):
    """The Model Folder as a list of one absolute path ([] when unset), for ``models list --folder``."""
    if prefs is None or not prefs.model_folder.strip():
        return []
    # DIR_PATH properties may hold Blender-relative ("//") or "~" paths.
    return [os.path.normpath(os.path.expanduser(bpy.path.abspath(prefs.model_folder.strip())))]


def remote_backend(prefs):
    """The preferences' GPU machine as a ``RemoteBackend`` when Backend is SSH, a ``ServerBackend`` when it is
    Server, else None (a local backend)."""
    if prefs is not None and prefs.backend_kind == "SERVER":
        token_file = bpy.path.abspath(prefs.server_token_file.strip()) if prefs.server_token_file.strip() else ""
        return ServerBackend(url=prefs.server_url.strip(), token=prefs.server_token, token_file=token_file)
    if prefs is None or prefs.backend_kind != "SSH":
        return None
    return RemoteBackend(host=prefs.ssh_host.strip(), python=prefs.remote_python.strip(),
                         folder=prefs.remote_folder.strip(), output_dir=prefs.remote_output_dir.strip(),
                         cache_dir=prefs.remote_cache_dir.strip(), ssh_options=prefs.ssh_options.strip())


def interpreter_path(prefs):
    """Return the configured backend interpreter as an absolute path ('' when unset)."""
    if prefs is None or not prefs.python_path.strip():
        return ""
    # FILE_PATH properties may hold Blender-relative ("//") or "~" paths.
    return bpy.path.abspath(prefs.python_path.strip())


classes = (SyncSpherePreferences,)
