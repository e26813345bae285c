"""The sphere and the canvas: geometry conventions, latent canvases with wrap-around, and view sets.

Plain numpy/torch, no model. May import the leaves (``errors``, ``request``) only.
"""
