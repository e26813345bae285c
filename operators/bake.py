"""Bake the active object's (SyncSphere) material into an image on its UV map. Thin: see material.py."""

import bpy
from bpy.props import IntProperty
from bpy.types import Operator

from ..blender_addon.scene import material


class SYNCSPHERE_OT_bake_to_uv(Operator):
    """Bake the active object's material colour into a new image on its UV map (Cycles)"""

    bl_idname = "syncsphere.bake_to_uv"
    bl_label = "Bake to UV Image"
    bl_options = {"REGISTER", "UNDO"}

    size: IntProperty(name="Size", description="Width and height of the baked image in pixels", default=1024, min=16, max=16384)

    @classmethod
    def poll(cls, context):
        return context.active_object is not None and context.active_object.type == "MESH"

    def execute(self, context):
        """Bake; report the new image's name or why it could not be baked."""
        try:
            image = material.bake_to_uv_image(context, context.active_object, size=self.size)
        except (ValueError, RuntimeError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        shown_by = material.materials_showing(context.active_object, image)
        where = f"; the material {', '.join(repr(name) for name in shown_by)} now shows it" if shown_by else ""
        self.report({"INFO"}, f"Baked into the image '{image.name}' (packed into the .blend file{where})")
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_bake_to_uv,)
