"""The add-on's plain-Python logic: no bpy, mathutils or bpy_extras, and nothing from ``scene/``,
``operators/`` or ``panels/`` (tests/test_addon_layers.py), so every module here runs and is tested without
Blender. The backend's defaults and the protocol come from the backend's own standard-library leaves
(``from ...backend import protocol, request``), which ship inside the extension.

This package imports nothing itself: importing one module loads only what that module needs.
"""
