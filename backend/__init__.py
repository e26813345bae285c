"""SyncSphere backend: synchronised multi-view diffusion for panoramas, 360° worlds and tiles.

This package runs in its own Python interpreter (one with torch and diffusers); it never imports bpy.
Entry points: ``python -m backend generate|info`` (see ``backend/app/cli.py``).
"""

__version__ = "0.1.0"
