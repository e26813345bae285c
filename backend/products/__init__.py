"""What a job leaves on disk: image files, the atomic writer, HDR lighting, the cube map, perspective views and a
job's set of outputs. No torch: numpy, scipy, Pillow and OpenEXR.

May import ``sphere`` and the leaves; never ``engine``, ``analysis`` or ``app``.
"""
