"""SyncSphere: the Blender extension's entry point.

Blender imports this package (as ``bl_ext.<repository>.syncsphere``) and calls ``register()`` when the
extension is enabled and ``unregister()`` when it is disabled. The add-on's logic is in ``blender_addon/``
(``core/``: plain Python; ``scene/``: Blender data), its buttons in ``operators/`` and ``panels/``; this module
only hands registration on to ``blender_addon.scene``, the operators and the panels.

Generation itself runs in a separate Python process (``python -m backend serve --stdio``, see
``blender_addon/core/backend_command.py``), so nothing imported here may import torch, and the add-on never
edits ``sys.path`` or ``sys.modules``.
"""

from .blender_addon import scene
from . import operators, panels

# Registration order matters: the panels draw the preferences and the operators, so those are
# registered first and unregistered last.
_MODULES = (scene, operators, panels)


def register():
    """Register every SyncSphere class with Blender."""
    for module in _MODULES:
        module.register()


def unregister():
    """Unregister every SyncSphere class, in the reverse order of ``register()``."""
    for module in reversed(_MODULES):
        module.unregister()
