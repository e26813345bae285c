"""Put a generated tileable texture on an object's material, bake it to the object's UVs, show panoramas.

Everything here works headless too (Blender as a Python module, background mode): nothing relies on a
window, an area or the user's selection, which the functions set themselves through the view layer and
``context.temp_override`` and give back afterwards.

Nodes the add-on owns carry fixed names (``SyncSphere ...``) so applying a new texture reuses them
instead of stacking another set; the user's other nodes are left alone.
"""

import math

import bpy

from .images import load_image

MATERIAL_NAME = "SyncSphere Material"
TEXCOORD_NODE = "SyncSphere Texture Coordinate"
MAPPING_NODE = "SyncSphere Mapping"
TEXTURE_NODE = "SyncSphere Texture"
BAKED_UV_NODE = "SyncSphere Baked UV"  # a UV Map node: the UV map the bake laid the image out on
BAKED_TEXTURE_NODE = "SyncSphere Baked Texture"  # the baked image, feeding the colour the bake read

# Blender 5.0 deprecates Material.use_nodes (materials always use nodes there), while in 4.x a new
# material has no node tree until use_nodes is switched on.
_NEEDS_USE_NODES = bpy.app.version < (5, 0, 0)

# On a material copied for a baked object (``use_baked_image``): the full name of the material it copies.
_BAKED_FROM_PROP = "syncsphere_baked_from"

# Horizontal gap between the nodes this module places, in node-editor units.
_NODE_SPACING = 300

# Cycles samples for baking. The emission bake below has no noise to average away; a few samples only
# anti-alias texels that straddle a texture edge.
_BAKE_SAMPLES = 4


# --- applying a texture --------------------------------------------------------------------------


def apply_tile_texture(obj, image_path, *, scale=1.0):
    """Put a tileable image on ``obj``'s active material, repeated ``scale`` times across its UVs.

    Takes the object (any type with material slots), the path of an image file (a PNG from the
    backend, read as sRGB) and the number of repeats across one UV unit. Wires
    Texture Coordinate (UV) -> Mapping -> Image Texture (repeat) -> Base Color of the material's
    Principled BSDF. The object's active material is used, or a new "SyncSphere Material" when it has
    none. Applying again reuses the same nodes and only swaps the image and the scale.

    Returns the material. Raises ValueError when the object cannot hold materials or the scale is not
    positive, and RuntimeError (from Blender) when the image cannot be read.
    """
    if obj is None or not hasattr(obj.data, "materials"):
        raise ValueError("SyncSphere needs a mesh (or other object with materials) to put a texture on")
    _check_scale(scale)
    image = load_image(image_path)
    # Generated textures are 8-bit sRGB PNGs; set it explicitly so a user default (or a file whose
    # metadata says otherwise) cannot make Blender read them as linear.
    image.colorspace_settings.name = "sRGB"

    material = obj.active_material
    if material is None:
        material = bpy.data.materials.new(MATERIAL_NAME)
        if obj.material_slots:
            obj.active_material = material  # fill the empty active slot, keep the other slots
        else:
            obj.data.materials.append(material)
    _ensure_node_tree(material)
    tree = material.node_tree

    principled = _find_principled(tree)
    if principled is None:
        principled = _new_principled(tree)
    base = principled.location

    texcoord = _named_node(tree, TEXCOORD_NODE, "ShaderNodeTexCoord",
                           (base.x - 3 * _NODE_SPACING, base.y))
    mapping = _named_node(tree, MAPPING_NODE, "ShaderNodeMapping", (base.x - 2 * _NODE_SPACING, base.y))
    texture = _named_node(tree, TEXTURE_NODE, "ShaderNodeTexImage", (base.x - _NODE_SPACING, base.y))

    texture.image = image
    # REPEAT is what makes the seamless texture tile when the mapping scales UVs beyond 0..1.
    texture.extension = "REPEAT"
    mapping.vector_type = "POINT"
    _set_mapping_scale(mapping, scale)

    # links.new replaces whatever fed an input before, so re-applying adds no duplicate links; only
    # Base Color is taken from the user's graph, nothing else is unlinked.
    links = tree.links
    links.new(texcoord.outputs["UV"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], principled.inputs["Base Color"])
    # Solid shading's "Texture" colour and Texture Paint show the active Image Texture node's image.
    tree.nodes.active = texture
    return material


def _tile_mapping(material):
    """The SyncSphere texture's Mapping node on ``material``, or None when ``material`` is None or has no such
    node (no texture applied, or the user deleted or replaced it)."""
    tree = material.node_tree if material is not None else None
    mapping = tree.nodes.get(MAPPING_NODE) if tree is not None else None
    return mapping if mapping is not None and mapping.bl_idname == "ShaderNodeMapping" else None


def tile_scale_socket(material):
    """The Scale input of the SyncSphere texture's Mapping node on ``material`` (how often it repeats per UV
    unit), or None when it has none (``_tile_mapping``). The panel draws it, so edits are live and undoable."""
    mapping = _tile_mapping(material)
    return mapping.inputs["Scale"] if mapping is not None else None


def set_tile_scale(material, scale):
    """Set how many times the SyncSphere texture repeats across one UV unit (on both axes).

    Takes a material that apply_tile_texture set up and a positive number. Returns nothing. Raises
    ValueError when the material has no SyncSphere mapping node or the scale is not positive.
    """
    _check_scale(scale)
    mapping = _tile_mapping(material)
    if mapping is None:
        raise ValueError("This material has no SyncSphere texture; apply a texture first")
    _set_mapping_scale(mapping, scale)


def _check_scale(scale):
    """Raise ValueError unless ``scale`` is a finite positive number."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"The tile scale must be a positive number, not {scale!r}")


def _set_mapping_scale(mapping, scale):
    """Scale UVs by ``scale`` on X and Y; Z stays 1 (UV coordinates have no depth to tile)."""
    mapping.inputs["Scale"].default_value = (scale, scale, 1.0)


def _ensure_node_tree(material):
    """Make ``material`` use nodes (only 4.x needs it: 5.0 deprecates use_nodes, always on there)."""
    if _NEEDS_USE_NODES and not material.use_nodes:
        # On a new 4.x material this creates the default Principled BSDF and Material Output.
        material.use_nodes = True
    if material.node_tree is None:
        raise RuntimeError(f"Material {material.name!r} has no node tree")


def _output_node(tree, target="ALL"):
    """Return the material output that renders for ``target`` ('ALL' or 'CYCLES'), or None."""
    node = tree.get_output_node(target)
    if node is None and target == "ALL":
        # A material may only have engine-specific outputs; Cycles' one is then the one to wire.
        node = tree.get_output_node("CYCLES") or tree.get_output_node("EEVEE")
    if node is None:
        node = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputMaterial"), None)
    return node


def _surface_shader(output):
    """Return the node linked into ``output``'s Surface input, or None."""
    if output is None or not output.inputs["Surface"].is_linked:
        return None
    return output.inputs["Surface"].links[0].from_node


def _find_principled(tree, output=None):
    """Return a Principled BSDF that renders: the output's Surface or upstream of it (Mix Shader...).

    A Principled BSDF that feeds nothing is not returned: a texture on it would never show.
    """
    output = output or _output_node(tree)
    start = _surface_shader(output)
    pending, seen = [start] if start is not None else [], set()
    while pending:
        node = pending.pop(0)  # breadth first: the one closest to the output wins
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.bl_idname == "ShaderNodeBsdfPrincipled":
            return node
        pending.extend(link.from_node for socket in node.inputs for link in socket.links)
    return None


def _new_principled(tree):
    """Add a Principled BSDF and make it the material's surface (adding an output if there is none)."""
    output = _output_node(tree)
    if output is None:
        output = tree.nodes.new("ShaderNodeOutputMaterial")
        output.location = (_NODE_SPACING, 0)
    principled = tree.nodes.new("ShaderNodeBsdfPrincipled")
    principled.location = (output.location.x - _NODE_SPACING, output.location.y)
    # The only unavoidable rewiring: without a Principled BSDF there is no Base Color to feed.
    tree.links.new(principled.outputs["BSDF"], output.inputs["Surface"])
    return principled


def _named_node(tree, name, idname, location):
    """Return the node called ``name`` if it has type ``idname``, else create it there at ``location``."""
    node = tree.nodes.get(name)
    if node is not None and node.bl_idname == idname:
        return node  # reused where the user may have moved it: the location is not touched
    if node is not None:
        # A user node of another type took the name: keep it, under a name that no longer clashes.
        node.name = f"{name} (user)"
    node = tree.nodes.new(idname)
    node.name = name
    if idname != "ShaderNodeTexImage":
        # Labels mark the add-on's nodes in the editor; an Image Texture keeps showing its image's name.
        node.label = name
    node.location = location
    return node


# --- baking --------------------------------------------------------------------------------------


def bake_to_uv_image(context, obj, *, size=1024, name=None):
    """Bake the colour of ``obj``'s materials into a new image laid out on its active UV map.

    Takes the context (its scene and view layer are used), a mesh object in that view layer, the
    image's width and height in pixels, and the image's name (default "<object> Baked"). A mesh with
    no UV map first gets one from Smart UV Project, which stays on the mesh since the image needs it.

    The bake is Cycles on the CPU with a few samples, type EMIT, after temporarily feeding each
    material's base colour (the Base Color of the Principled BSDF that renders, else the Color of the
    shader on the output) into an Emission shader of strength 1 on the material output. An emission
    bake writes that colour exactly; a DIFFUSE colour-only bake was not used because Cycles' Principled
    BSDF reports the diffuse albedo after the specular layer has taken its share (about 4 % darker at
    the default IOR) and as black for metallic materials. Lighting, shadows and world play no part.

    The scene's render engine, Cycles samples and device, the selection, the active object and the
    object's mode are restored afterwards, and every temporary node is removed, also on errors. The
    image (8-bit sRGB, no alpha) is packed into the .blend file and saved nowhere on disk; texels
    outside the UV islands (beyond the bake margin) are black.

    The image is then what the object's materials show (``use_baked_image``): each gets a UV Map node
    (the bake's UV map) and an Image Texture of the image feeding the colour the bake read, so the image has
    a real user and stays in the file after saving and reopening (a packed image nobody uses is dropped on
    save). The nodes that fed that colour before stay in the tree, unlinked; a material other objects use
    too is copied for this object first, so theirs keep their look.

    Returns the image. Raises ValueError for a non-mesh object, an object outside the view layer, or
    one without a (node-based) material whose colour can be found, and RuntimeError when Blender's
    bake fails (e.g. the object is hidden).
    """
    if obj is None or obj.type != "MESH":
        raise ValueError("SyncSphere can only bake mesh objects")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"The baked image size must be a positive whole number, not {size!r}")
    scene = context.scene
    view_layer = context.view_layer
    if view_layer.objects.get(obj.name) != obj:
        raise ValueError(f"{obj.name!r} is not in the view layer {view_layer.name!r}; it cannot be baked")
    if not hasattr(scene, "cycles"):
        raise RuntimeError("Baking needs Cycles: enable the Cycles Render Engine add-on")
    materials = _unique_materials(obj)
    if not materials:
        raise ValueError(f"{obj.name!r} has no material to bake")
    # Checked before anything changes, so a refusal leaves the mesh, materials and scene untouched.
    for material in materials:
        if material.node_tree is None or (_NEEDS_USE_NODES and not material.use_nodes):
            # Not switched on here: Cycles renders such a 4.x material from its viewport colour, which
            # the default nodes that use_nodes creates would not reproduce.
            raise ValueError(f"Material {material.name!r} does not use nodes; turn on Use Nodes to bake it")
        output = _output_node(material.node_tree, "CYCLES")
        if output is None or _colour_source(material.node_tree, output) is None:
            raise ValueError(_no_colour_message(material))

    image = bpy.data.images.new(name or f"{obj.name} Baked", size, size, alpha=False)
    try:
        uv_map = _bake_emission(context, scene, view_layer, obj, materials, image)
    except BaseException:
        bpy.data.images.remove(image)  # no half-baked image left behind
        raise
    # Packed so that the baked pixels survive saving and reopening the .blend file: a generated image
    # that was never packed or saved comes back blank. Packing alone is not enough: an image without
    # users is not written at all, so the materials use it.
    image.pack()
    use_baked_image(obj, image, uv_map)
    return image


def use_baked_image(obj, image, uv_map):
    """Make ``obj``'s materials show ``image``, baked on its UV map named ``uv_map``; returns the materials.

    In each material (node-based, with a colour the bake can read: ``_colour_source``) a UV Map node
    (``BAKED_UV_NODE``, ``uv_map``) feeds an Image Texture of ``image`` (``BAKED_TEXTURE_NODE``), whose
    Color takes the place of what fed that colour before: the generated texture's nodes, or the user's,
    stay in the tree, only the one link into the colour is replaced (a colour that was a plain value keeps
    its value, unused). Baking again reuses the two nodes and swaps the image. A material that another
    object (or another mesh) uses too is first copied and the copy put in this object's slots, so the other
    objects keep their look; the bake is laid out on this object's UVs only.
    """
    users = bpy.data.user_map(subset=set(_unique_materials(obj)))
    wired = []
    for slot in obj.material_slots:
        material = slot.material
        if material is None or (_NEEDS_USE_NODES and not material.use_nodes) or material.node_tree is None:
            continue
        if material not in wired and users.get(material, set()) - {obj, obj.data}:
            copy = next((done for done in wired if done.get(_BAKED_FROM_PROP) == material.name_full), None)
            if copy is None:
                copy = material.copy()
                copy.name = f"{material.name} Baked"
                copy[_BAKED_FROM_PROP] = material.name_full
            slot.material = material = copy
        if material in wired:
            continue
        tree = material.node_tree
        colour = _colour_source(tree, _output_node(tree, "CYCLES"))
        if colour is None:
            continue
        base = colour.node.location
        uv = _named_node(tree, BAKED_UV_NODE, "ShaderNodeUVMap", (base.x - 2 * _NODE_SPACING, base.y - _NODE_SPACING))
        uv.uv_map = uv_map
        texture = _named_node(tree, BAKED_TEXTURE_NODE, "ShaderNodeTexImage", (base.x - _NODE_SPACING, base.y - _NODE_SPACING))
        texture.image = image
        tree.links.new(uv.outputs["UV"], texture.inputs["Vector"])
        tree.links.new(texture.outputs["Color"], colour)
        tree.nodes.active = texture  # what Solid shading's "Texture" colour shows
        wired.append(material)
    return wired


def materials_showing(obj, image):
    """The names (sorted) of ``obj``'s materials whose ``BAKED_TEXTURE_NODE`` shows ``image``."""
    names = set()
    for slot in obj.material_slots:
        tree = slot.material.node_tree if slot.material is not None else None
        node = tree.nodes.get(BAKED_TEXTURE_NODE) if tree is not None else None
        if node is not None and node.bl_idname == "ShaderNodeTexImage" and node.image == image:
            names.add(slot.material.name)
    return sorted(names)


def _bake_emission(context, scene, view_layer, obj, materials, image):
    """Run the emission bake of ``obj`` into ``image``; scene and materials are restored afterwards.
    Returns the name of the UV map the image is laid out on."""
    saved = _save_scene_state(scene, view_layer, obj)
    temporary = []
    try:
        _make_only_active_selected(context, view_layer, obj)
        if not obj.data.uv_layers:
            _smart_uv_project(context, obj)
        for material in materials:
            temporary.append(_prepare_emission_bake(material, image))

        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU"  # GPU set-up is per machine; a colour bake is quick on the CPU
        scene.cycles.samples = _BAKE_SAMPLES
        # Operator arguments override the scene's bake settings for this call without writing them
        # back. The margin grows the islands' edge texels outwards so filtering does not pull in black.
        uv_map = obj.data.uv_layers.active.name
        with context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                   selected_editable_objects=[obj]):
            result = bpy.ops.object.bake(
                type="EMIT", target="IMAGE_TEXTURES", save_mode="INTERNAL", use_clear=True,
                use_selected_to_active=False, margin=max(2, image.size[0] // 64), uv_layer=uv_map,
            )
        if "FINISHED" not in result:
            raise RuntimeError(f"Baking {obj.name!r} did not finish ({', '.join(result)})")
        return uv_map
    finally:
        for undo in reversed(temporary):
            undo()
        _restore_scene_state(context, scene, view_layer, obj, saved)


def _unique_materials(obj):
    """Return the object's materials, each once, in slot order (empty slots skipped)."""
    found = {}
    for slot in obj.material_slots:
        if slot.material is not None:
            found.setdefault(slot.material.name_full, slot.material)
    return list(found.values())


def _colour_source(tree, output):
    """Return the input socket that holds the material's colour, or None.

    The Base Color of the Principled BSDF that renders (as apply_tile_texture wires it), else the Color
    input of whichever shader is on the output (Diffuse, Emission...).
    """
    principled = _find_principled(tree, output)
    if principled is not None:
        return principled.inputs["Base Color"]
    shader = _surface_shader(output)
    if shader is not None and "Color" in shader.inputs:
        return shader.inputs["Color"]
    return None


def _no_colour_message(material):
    """Return the sentence for a material whose colour the bake cannot find."""
    return (f"Cannot find the colour of material {material.name!r}: it needs a Principled BSDF (or a "
            "shader with a Color input) on its Material Output")


def _prepare_emission_bake(material, image):
    """Route ``material``'s colour into an emission surface and add the bake target node.

    Returns a function that removes both again and restores the output's original Surface link and
    the tree's active node. Raises ValueError when the material's colour cannot be found.
    """
    tree = material.node_tree
    nodes, links = tree.nodes, tree.links
    output = _output_node(tree, "CYCLES")
    colour = _colour_source(tree, output) if output is not None else None
    if colour is None:  # bake_to_uv_image checks first; kept so this never links from None
        raise ValueError(_no_colour_message(material))
    surface = output.inputs["Surface"]
    previous_surface = surface.links[0].from_socket if surface.is_linked else None
    previous_active = nodes.active

    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 1.0
    if colour.is_linked:
        links.new(colour.links[0].from_socket, emission.inputs["Color"])
    else:
        emission.inputs["Color"].default_value = colour.default_value
    links.new(emission.outputs["Emission"], surface)

    # Cycles bakes into the active (and selected) Image Texture node of each material; it is left
    # unlinked so the image is only written, never read, during the bake.
    target = nodes.new("ShaderNodeTexImage")
    target.image = image
    target.select = True
    nodes.active = target

    def undo():
        nodes.remove(target)
        nodes.remove(emission)  # removes its links too
        if previous_surface is not None:
            links.new(previous_surface, surface)
        if previous_active is not None:
            nodes.active = previous_active

    return undo


def _save_scene_state(scene, view_layer, obj):
    """Return what bake_to_uv_image changes: engine, Cycles settings, selection, active object, mode."""
    return {
        "engine": scene.render.engine,
        "device": scene.cycles.device,
        "samples": scene.cycles.samples,
        "selected": [o for o in view_layer.objects if o.select_get(view_layer=view_layer)],
        "active": view_layer.objects.active,
        "mode": obj.mode,
    }


def _restore_scene_state(context, scene, view_layer, obj, saved):
    """Give back what _save_scene_state recorded."""
    scene.render.engine = saved["engine"]
    scene.cycles.device = saved["device"]
    scene.cycles.samples = saved["samples"]
    if obj.mode != saved["mode"]:
        _set_mode(context, obj, saved["mode"])
    for other in view_layer.objects:
        other.select_set(False, view_layer=view_layer)
    for other in saved["selected"]:
        other.select_set(True, view_layer=view_layer)
    view_layer.objects.active = saved["active"]


def _make_only_active_selected(context, view_layer, obj):
    """Select only ``obj`` and make it active, in Object Mode: the bake works on all selected objects."""
    if obj.mode != "OBJECT":
        _set_mode(context, obj, "OBJECT")  # edit-mode changes reach the mesh only on leaving edit mode
    active = view_layer.objects.active
    if active is not None and active != obj and active.mode != "OBJECT":
        _set_mode(context, active, "OBJECT")
    for other in view_layer.objects:
        other.select_set(False, view_layer=view_layer)
    obj.select_set(True, view_layer=view_layer)
    view_layer.objects.active = obj


def _set_mode(context, obj, mode):
    """Switch ``obj`` to ``mode`` ('OBJECT', 'EDIT'...) whatever the current window or area is."""
    with context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                               selected_editable_objects=[obj]):
        bpy.ops.object.mode_set(mode=mode)


def _smart_uv_project(context, obj):
    """Give ``obj``'s mesh a UV map with Smart UV Project (an edit-mode operator, run headless-safe)."""
    _set_mode(context, obj, "EDIT")
    try:
        with context.temp_override(active_object=obj, object=obj, edit_object=obj):
            bpy.ops.mesh.select_all(action="SELECT")  # Smart UV Project unwraps the selected faces
            # A small island margin keeps the bake margin of one island from bleeding into another.
            bpy.ops.uv.smart_project(island_margin=0.02)
    finally:
        _set_mode(context, obj, "OBJECT")


# --- panoramas -----------------------------------------------------------------------------------


def load_image_in_editor(image_path):
    """Load an image (e.g. a wide panorama) and show it, fitted, in every open Image Editor.

    Takes the image file's path (Blender "//" relative paths allowed). An image already loaded from
    that path is reused and re-read. UV Editors and Image Editors with a pinned image are left alone.
    With no Image Editor open (always so in background mode) the image is only loaded. Returns the
    image; raises RuntimeError (from Blender) when the file cannot be read.
    """
    image = load_image(image_path)
    context = bpy.context
    window_manager = context.window_manager
    for window in window_manager.windows if window_manager is not None else ():
        for area in window.screen.areas:
            # ui_type tells the Image Editor from the UV Editor, which share the area type.
            if area.ui_type != "IMAGE_EDITOR" or area.spaces.active.use_image_pin:
                continue
            area.spaces.active.image = image
            region = next((r for r in area.regions if r.type == "WINDOW"), None)
            if region is not None:
                # A 2:1 panorama is wider than most editors at 1:1; fit it so all of it shows.
                with context.temp_override(window=window, area=area, region=region):
                    bpy.ops.image.view_all(fit_view=True)
            area.tag_redraw()
    return image
