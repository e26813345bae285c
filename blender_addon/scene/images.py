"""Loading generated image files into Blender."""

import bpy


def load_image(image_path):
    """Load an image file and return the Image, reusing the one already loaded from that path.

    A reused image is re-read: the file may have been rewritten since (same output path), and its
    stale pixels must not be shown.
    """
    path = bpy.path.abspath(image_path)
    count = len(bpy.data.images)
    image = bpy.data.images.load(path, check_existing=True)
    if len(bpy.data.images) == count:
        image.reload()
    return image
