"""Blender-side logic of SyncSphere: preferences, scene settings, the backend worker client, and the
World / material appliers. Operators and panels stay thin and call into this package.

Plain-Python modules (no bpy): ``backend_command`` (how the backend is started), ``worker_client`` (the
protocol's client side), ``session`` (the shared worker and current job), ``generation`` (settings ->
request). They are tested without Blender.
"""

import bpy

from . import backend_command, generation, preferences, properties, session
from .preferences import ADDON_PACKAGE, get_preferences, interpreter_path, output_folder

__all__ = ["ADDON_PACKAGE", "backend_command", "generation", "get_preferences", "interpreter_path",
           "output_folder", "register", "session", "unregister"]

_register_preferences, _unregister_preferences = bpy.utils.register_classes_factory(preferences.classes)


def register():
    """Register the preferences and the per-scene settings."""
    _register_preferences()
    properties.register()


def unregister():
    """Stop the backend worker, free thumbnails, and unregister in reverse order."""
    from . import results

    session.shutdown()
    results.free_thumbnails()
    properties.unregister()
    _unregister_preferences()
