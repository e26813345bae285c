"""SyncSphere panels: one in the World properties tab, one in the 3D viewport sidebar.

Both draw the same content: the backend settings from the preferences and the backend check. The
generate UI is a later step; the panels say so rather than showing controls that do nothing.
"""

import bpy
from bpy.types import Panel

from ..blender_addon import get_preferences


def draw_syncsphere(layout, context):
    """Draw the shared SyncSphere panel content into ``layout``."""
    prefs = get_preferences(context)
    col = layout.column()
    if prefs is None:
        # Happens only when the add-on was registered without being enabled (e.g. from a script).
        col.label(text="SyncSphere preferences are not available", icon="ERROR")
    else:
        col.use_property_split = True
        col.use_property_decorate = False
        col.prop(prefs, "python_path", text="Python")
        col.prop(prefs, "default_model", text="Model")
    row = layout.row(align=True)
    row.operator("syncsphere.check_backend", icon="CONSOLE")
    row.operator("syncsphere.open_output_folder", text="", icon="FILE_FOLDER")
    # Honest about the state of the add-on: the generate UI is not built yet.
    layout.label(text="Generating from Blender is coming in a later version", icon="INFO")


class SYNCSPHERE_PT_world(Panel):
    """SyncSphere in the World properties tab"""

    bl_idname = "SYNCSPHERE_PT_world"
    bl_label = "SyncSphere"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "world"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        """Draw the shared content."""
        draw_syncsphere(self.layout, context)


class SYNCSPHERE_PT_view3d(Panel):
    """SyncSphere in the 3D viewport sidebar (N panel)"""

    bl_idname = "SYNCSPHERE_PT_view3d"
    bl_label = "SyncSphere"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "SyncSphere"

    def draw(self, context):
        """Draw the shared content."""
        draw_syncsphere(self.layout, context)


_CLASSES = (SYNCSPHERE_PT_world, SYNCSPHERE_PT_view3d)


# Blender's own helper: registers in order, unregisters in reverse.
register, unregister = bpy.utils.register_classes_factory(_CLASSES)
