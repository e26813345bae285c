"""Update Lighting: apply the scene's SyncSphere World again with the current Lighting settings. Thin: the
work is in ``blender_addon.scene.world.apply_lit_world``."""

from bpy.types import Operator

from ..blender_addon.scene import world


class SYNCSPHERE_OT_update_lighting(Operator):
    """Apply the SyncSphere World again with the current Lighting settings (HDR, Sun mode), keeping its rotation and strength"""

    bl_idname = "syncsphere.update_lighting"
    bl_label = "Update Lighting"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return world.is_syncsphere_world(context.scene.world)

    def execute(self, context):
        """Re-apply the World's own EXR (and the lighting files next to it) as a new SyncSphere World."""
        settings = context.scene.syncsphere
        current = context.scene.world
        try:
            new_world, note = world.apply_lit_world(
                context, {"exr": current[world.SOURCE_PROP]}, hdr=settings.hdr, sun_mode=settings.sun_mode,
                rotation=world.world_rotation(current), strength=world.world_strength(current), hide_from_camera=settings.hide_from_camera)
        except FileNotFoundError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, f"The world '{new_world.name}' now lights the scene{note}.")
        return {"FINISHED"}


classes = (SYNCSPHERE_OT_update_lighting,)
