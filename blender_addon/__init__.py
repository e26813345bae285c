"""Blender-side logic of SyncSphere: preferences, and (later) scene properties, the backend worker
client and the World / material appliers. Operators and panels stay thin and call into this package.

``backend_command`` is plain Python (no bpy), so the way the backend is started is tested anywhere.
"""

import bpy

from . import preferences
from .preferences import ADDON_PACKAGE, get_preferences, interpreter_path, output_folder

__all__ = ["ADDON_PACKAGE", "get_preferences", "interpreter_path", "output_folder",
           "register", "unregister"]

_CLASSES = preferences.classes


# Blender's own helper: registers in order, unregisters in reverse.
register, unregister = bpy.utils.register_classes_factory(_CLASSES)
