"""SyncSphere's Blender-side logic, in two parts (docs/architecture.md, docs/blender.md "Layout"):

- ``core/``: plain Python, no bpy: how the backend is started and set up (``backend_command``,
  ``backend_setup``), the protocol's client side and the shared worker (``worker_client``, ``session``),
  scene settings -> generate params (``generation``), the lighting of a HDR World (``lighting``), and the
  models list (``model_list``). It imports only the standard library, itself and the backend's
  standard-library leaves (``backend/protocol.py``, ``backend/request.py``), so it is tested without Blender.
- ``scene/``: what touches Blender data: preferences, per-scene properties, the World and material
  appliers, images, the results history, and the registration of its classes. It may import ``core``.

Operators and panels stay thin and call into both. This module imports nothing, so ``core`` is importable
without bpy; ``tests/test_addon_layers.py`` enforces the rule.
"""
