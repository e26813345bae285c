"""The add-on's Blender-facing part: preferences, per-scene settings, the World and material appliers,
images and the results history. It may import ``core``, never ``operators`` or ``panels``
(tests/test_addon_layers.py).

``register()`` / ``unregister()`` register the preferences and the per-scene settings; the extension's root
``__init__.py`` calls them before the operators and panels.
"""

import bpy

from ..core import session
from . import preferences, properties, results

_register_preferences, _unregister_preferences = bpy.utils.register_classes_factory(preferences.classes)


def register():
    """Register the preferences and the per-scene settings."""
    _register_preferences()
    properties.register()


def unregister():
    """Stop the backend worker, free thumbnails, and unregister in reverse order."""
    session.shutdown()
    results.free_thumbnails()
    properties.unregister()
    _unregister_preferences()
