"""The add-on preferences: which Python runs the backend, which model, which device, where outputs go."""

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy.types import AddonPreferences

# Preferences belong to the add-on, whose package is the parent of this one
# (``bl_ext.<repository>.syncsphere.blender_addon`` -> ``bl_ext.<repository>.syncsphere``).
ADDON_PACKAGE = __package__.rpartition(".")[0]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"

# Sub-folder of the extension's user folder that holds generated images when no folder is chosen.
OUTPUTS_SUBFOLDER = "outputs"


class SyncSpherePreferences(AddonPreferences):
    """SyncSphere settings shared by every .blend file."""

    bl_idname = ADDON_PACKAGE

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
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "python_path")
        layout.prop(self, "default_model")
        layout.prop(self, "device")
        layout.prop(self, "output_dir")
        layout.prop(self, "keep_warm")
        layout.prop(self, "timeout_s")
        row = layout.row(align=True)
        row.operator("syncsphere.setup_backend", icon="IMPORT")
        row.operator("syncsphere.check_backend", icon="CONSOLE")


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
    # Never inside the extension folder: Blender wipes it on every upgrade (design section 7).
    return user_folder(OUTPUTS_SUBFOLDER)


def interpreter_path(prefs):
    """Return the configured backend interpreter as an absolute path ('' when unset)."""
    if prefs is None or not prefs.python_path.strip():
        return ""
    # FILE_PATH properties may hold Blender-relative ("//") or "~" paths.
    return bpy.path.abspath(prefs.python_path.strip())


classes = (SyncSpherePreferences,)
