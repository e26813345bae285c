"""The SyncSphere panels (panels/__init__.py) drawn in headless Blender against a recording UILayout.

The bpy module has no UI, so a panel's ``draw`` cannot run against a real ``UILayout``. Instead each
panel class (and so each ``draw_*`` function) draws into ``RecordingLayout``, a stand-in that records
every call and checks it against Blender's own description of ``UILayout`` (``bl_rna.functions`` and
``bl_rna.properties``): an unknown method or attribute, a wrong or missing argument, an icon that does
not exist, a ``prop()`` naming a property the data does not have, an ``index`` past the end of an
array, or an operator that is not registered all fail loudly. What was drawn is then asserted on
here.

Like tests/test_extension.py, everything that imports bpy runs in a fresh interpreter with the
add-on registered and enabled (``preferences.addons.new()``), against the real scene settings and
preferences; the subprocess prints one ``RESULT <json>`` line. No torch is needed: runs on bpy 5.0
and 4.2 alike.
"""

import json

import pytest

from test_extension import _ENABLE_ADDON, _PRELUDE, _WRITE_EXR, _bpy_dir, _run_python

pytestmark = pytest.mark.skipif(_bpy_dir() is None, reason="bpy is not installed")

# Every setting of SyncSphereSettings that the user edits (history and history_index are drawn as the
# History panel, not as properties).
SETTINGS = {"prompt", "style", "style_prompt", "negative_prompt", "mode", "resolution", "quality", "seed", "randomize_seed",
            "variations", "steps", "guidance",
            "sync_method", "sync_weight", "sync_steps", "sync_fast", "syncsde_lambda", "mad", "view_set",
            "prompt_up", "prompt_down", "window", "stride", "device", "memory", "quantize", "hide_from_camera",
            "face_camera", "preview_in_world"}
# Issue 18's image controls in the main panel: Start from Image always; Width and Height only with Size = Custom,
# Image File only with Start from Image = File, Strength with a file or the World's image.
SETTINGS |= {"custom_width", "custom_height", "start_image_source", "start_image_path", "strength"}
CONDITIONAL_IMAGE_SETTINGS = {"custom_width", "custom_height", "start_image_path", "strength"}
# Extend Photo (a 360° World's, under Start from Image): its file, field of view, yaw and pitch only when it is on.
SETTINGS |= {"extend_photo", "photo_path", "photo_fov", "photo_yaw", "photo_pitch"}
CONDITIONAL_IMAGE_SETTINGS |= {"photo_path", "photo_fov", "photo_yaw", "photo_pitch"}
# The Lighting sub-panel's (360° World; tests/test_blender_lighting.py draws it in detail).
SETTINGS |= {"hdr", "exposure", "sun_ratio", "use_sun_direction", "sun_yaw", "sun_pitch", "sun_mode"}
# The Advanced sub-panel's synchronisation controls (the research controls; the main panel has Quality).
SYNC_SETTINGS = {"sync_method", "sync_weight", "sync_steps", "sync_fast", "syncsde_lambda", "mad"}
# SyncDiffusion's options, drawn (right under the Synchronisation menu) only when it is chosen.
SYNCDIFFUSION_SETTINGS = ["sync_weight", "sync_steps", "sync_fast"]
# SyncSDE's option, drawn (right under the Synchronisation menu) only when it is chosen.
SYNCSDE_SETTINGS = ["syncsde_lambda"]
# Each method's own options, by method (MultiDiffusion has none).
METHOD_SETTINGS = {"AUTO": [], "MULTIDIFFUSION": [], "SYNCDIFFUSION": SYNCDIFFUSION_SETTINGS, "SYNCSDE": SYNCSDE_SETTINGS}
# A 360° World's view set and sky / ground prompts, drawn (in Advanced, right under the guidance) only in WORLD mode.
WORLD_VIEW_SETTINGS = ["view_set", "prompt_up", "prompt_down"]
# The main panel, top to bottom (issue 21): Prompt, Style (its menu, then the Style Prompt and Avoid it fills), Mode,
# Size, Quality, Seed (and Randomize), Generate (and its Variations count). "style" is the Style menu (an operator's
# menu, see _main_rows) and "generate" the Generate button.
MAIN_ROWS = ["prompt", "style", "style_prompt", "negative_prompt", "mode", "resolution", "quality",
             "start_image_source", "extend_photo", "seed", "randomize_seed", "generate", "variations"]
# With Size = Custom and Start from Image = File: Width and Height under the Size, Image File and Strength under
# Start from Image.
MAIN_ROWS_WITH_IMAGE = ["prompt", "style", "style_prompt", "negative_prompt", "mode", "resolution", "custom_width",
                        "custom_height", "quality", "start_image_source", "start_image_path", "strength", "extend_photo", "seed",
                        "randomize_seed", "generate", "variations"]
# The research controls, all in the Advanced sub-panel (for a 360° World; WORLD_VIEW_SETTINGS only there).
ADVANCED_SETTINGS = ["steps", "guidance"] + WORLD_VIEW_SETTINGS + ["sync_method", "mad", "window", "stride", "device",
                                                                  "memory", "quantize"]

# Runs after _PRELUDE: registers and enables the add-on and defines the recording layout.
_HELPERS = r"""
import functools, json, os, sys, types
import numpy as np
import bpy

""" + _ENABLE_ADDON + r"""
from syncsphere import panels
from syncsphere.blender_addon.core import session
from syncsphere.blender_addon.scene import material, results, world as W
from syncsphere.blender_addon.scene.preferences import get_preferences

context = bpy.context
scene = context.scene
settings = scene.syncsphere
prefs = get_preferences(context)
assert prefs is not None
prefs.python_path = sys.executable  # a configured backend: no "set the backend Python" hint

UI_FUNCTIONS = bpy.types.UILayout.bl_rna.functions
UI_PROPERTIES = bpy.types.UILayout.bl_rna.properties

# Objects the recording names instead of printing their repr: name -> bpy struct (compared by pointer).
TARGETS = {}


def result(value):
    print("RESULT " + json.dumps(value))


def describe(value):
    '''A JSON-able description of an argument: a TARGETS name for known bpy structs.'''
    if isinstance(value, bpy.types.bpy_struct):
        if value == settings:
            return "settings"
        if value == prefs:
            return "prefs"
        for name, target in TARGETS.items():
            if value == target:
                return name
        return repr(value)
    return value


def operator_rna(idname):
    '''The RNA of a registered operator ("module.name"), or fail.'''
    module, _, name = idname.partition(".")
    try:
        return getattr(getattr(bpy.ops, module), name).get_rna_type()
    except (AttributeError, KeyError):
        raise AssertionError(f"operator {idname!r} is not registered") from None


def check_value(where, parameter, value):
    '''Check ``value`` against an RNA parameter or property's type (and enum items).'''
    kind = parameter.type
    ok = {
        "STRING": lambda: isinstance(value, str),
        "BOOLEAN": lambda: isinstance(value, bool),
        "INT": lambda: isinstance(value, int),  # Blender takes a bool for an INT (toggle=True)
        "FLOAT": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        "ENUM": lambda: isinstance(value, str) and value in parameter.enum_items.keys(),
        "POINTER": lambda: isinstance(value, bpy.types.bpy_struct),
    }.get(kind, lambda: True)()
    if not ok:
        raise AssertionError(f"{where}: {parameter.identifier}={value!r} is not a valid {kind}")


class RecordingOperatorProperties:
    '''What operator() returns: setting an attribute must name one of the operator's properties.'''

    def __init__(self, idname, record):
        object.__setattr__(self, "_rna", operator_rna(idname))
        object.__setattr__(self, "_record", record)

    def __setattr__(self, name, value):
        properties = self._rna.properties
        if name == "rna_type" or name not in properties:
            raise AssertionError(f"operator {self._record['args']['operator']!r} has no property {name!r}")
        check_value(f"operator {self._record['args']['operator']}", properties[name], value)
        self._record["properties"][name] = value

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._record["properties"][name]
        except KeyError:
            raise AssertionError(f"reading {name!r} of operator properties that were not set") from None


class RecordingLayout:
    '''Stands in for bpy.types.UILayout: records calls, checked against UILayout's RNA.'''

    def __init__(self, calls, path="layout"):
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_attributes", {})

    def __setattr__(self, name, value):
        if name == "rna_type" or name not in UI_PROPERTIES or UI_PROPERTIES[name].is_readonly:
            raise AssertionError(f"UILayout has no writable attribute {name!r}")
        check_value(f"{self._path}.{name}", UI_PROPERTIES[name], value)
        self._attributes[name] = value

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._attributes:
            return self._attributes[name]
        if name in UI_PROPERTIES and name != "rna_type":
            return UI_PROPERTIES[name].default
        if name not in UI_FUNCTIONS:
            raise AssertionError(f"UILayout has no method or attribute {name!r}")
        return functools.partial(self._call, name)

    def _call(self, method, *args, **kwargs):
        function = UI_FUNCTIONS[method]
        inputs = [p for p in function.parameters if not p.is_output]
        outputs = [p for p in function.parameters if p.is_output]
        where = f"{self._path}.{method}()"
        if len(args) > len(inputs):
            raise AssertionError(f"{where}: {len(args)} positional arguments, takes {len(inputs)}")
        bound = dict(zip((p.identifier for p in inputs), args))
        for name, value in kwargs.items():
            if name in bound:
                raise AssertionError(f"{where}: {name} given twice")
            bound[name] = value
        by_name = {p.identifier: p for p in inputs}
        for name, value in bound.items():
            if name not in by_name:
                raise AssertionError(f"{where}: unknown argument {name!r}")
            check_value(where, by_name[name], value)
        for parameter in inputs:
            if parameter.is_required and parameter.identifier not in bound:
                raise AssertionError(f"{where}: missing argument {parameter.identifier!r}")

        if "data" in bound and "property" in bound:  # prop, prop_enum, prop_menu_enum, prop_search ...
            data, name = bound["data"], bound["property"]
            properties = data.bl_rna.properties
            if name == "rna_type" or name not in properties or not hasattr(data, name):
                raise AssertionError(f"{where}: {data!r} has no property {name!r}")
            index = bound.get("index", -1)
            if index != -1 and not (properties[name].is_array and 0 <= index < properties[name].array_length):
                raise AssertionError(f"{where}: index {index} of {name!r}, which is not an array that long")
            if "value" in bound and bound["value"] not in properties[name].enum_items.keys():
                raise AssertionError(f"{where}: {bound['value']!r} is not an item of {name!r}")

        index = len(self._calls)
        record = {"method": method, "path": self._path, "index": index,
                  "args": {name: describe(value) for name, value in bound.items()}, "properties": {}}
        self._calls.append(record)
        if "operator" in bound:
            operator_rna(bound["operator"])  # fails for an unregistered operator
        if not outputs:
            return None
        kind = outputs[0].fixed_type.identifier
        if kind == "UILayout":
            return RecordingLayout(self._calls, f"{self._path}/{method}#{index}")
        if kind == "OperatorProperties":
            return RecordingOperatorProperties(bound["operator"], record)
        raise AssertionError(f"{where}: the stand-in does not know what to return ({kind})")


def draw(idname):
    '''Run the registered panel class ``idname``'s draw against a recording layout; return its calls.'''
    cls = getattr(bpy.types, idname)
    assert cls.is_registered, idname
    calls = []
    cls.draw(types.SimpleNamespace(layout=RecordingLayout(calls), bl_idname=idname), context)
    return calls


def draw_all():
    '''Every SyncSphere panel drawn: {bl_idname: calls}, asserting both locations draw the same.'''
    drawn = {cls.bl_idname: draw(cls.bl_idname) for cls in panels._CLASSES}
    for idname, calls in drawn.items():
        if idname.startswith("SYNCSPHERE_PT_world"):
            twin = idname.replace("SYNCSPHERE_PT_world", "SYNCSPHERE_PT_view3d")
            assert calls == drawn[twin], (idname, calls, drawn[twin])
    return drawn


def write_png(name, size=(16, 8), colour=(0.8, 0.4, 0.2)):
    '''Write a small sRGB PNG in the working folder and return its absolute path.'''
    path = os.path.join(TMP, name)
    width, height = size
    image = bpy.data.images.new(name, width, height)
    pixels = np.ones((height, width, 4), np.float32)
    pixels[..., :3] = colour
    image.pixels.foreach_set(pixels.ravel())
    image.filepath_raw = path
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)
    return path


""" + _WRITE_EXR + r"""

def finish():
    '''Disable and unregister the add-on, as Blender does, so the interpreter exits cleanly.'''
    bpy.context.preferences.addons.remove(entry)
    addon.unregister()
"""


def _blender(code, tmp_path):
    """Run ``code`` after the helpers in a fresh bpy interpreter; return what it passed to result()."""
    done = _run_python(_PRELUDE + _HELPERS + f"TMP = {str(tmp_path)!r}\n"
                       + code + "\nfinish()\n")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def _props(calls, data):
    """The property names drawn with prop() on ``data`` (a describe() name); for "settings" also "style" where the
    Style menu is drawn (the apply_style operator's menu, which sets ``settings.style``)."""
    return [call["args"].get("property", "style") for call in calls
            if call["method"] == "prop" and call["args"]["data"] == data
            or data == "settings" and call["method"] == "operator_menu_enum"
            and call["args"]["operator"] == "syncsphere.apply_style"]


def _main_rows(calls):
    """The main panel's controls in drawing order: its settings (``_props``, the Style menu as "style") and
    "generate" for the Generate button."""
    return [call["args"].get("property", "style") if call["method"] != "operator" else call["args"]["operator"].split(".")[1]
            for call in calls
            if call["method"] == "prop" and call["args"]["data"] == "settings"
            or call["method"] == "operator_menu_enum" or call["method"] == "operator"]


def _notes(calls):
    """The labels drawn, except the Style menu's own ("Style", to the left of the menu)."""
    return [call for call in calls if call["method"] == "label" and call["args"]["text"] != "Style"]


def _operators(calls):
    return [call["args"]["operator"] for call in calls if call["method"] == "operator"]


def _under(calls, record):
    """The calls made inside the layout that ``record`` (a row/column/box call) returned."""
    prefix = f"{record['path']}/{record['method']}#{record['index']}"
    return [call for call in calls if call["path"] == prefix or call["path"].startswith(prefix + "/")]


# --- the stand-in itself -------------------------------------------------------------------------


def test_the_recording_layout_rejects_what_the_real_one_would(tmp_path):
    """Typos in a method, attribute, property, argument, icon or operator name all fail loudly."""
    failures = _blender("""
layout = RecordingLayout([])
attempts = {
    "method": lambda: layout.propp(settings, "prompt"),
    "attribute": lambda: setattr(layout, "use_property_splitt", True),
    "property": lambda: layout.prop(settings, "promt"),
    "argument": lambda: layout.prop(settings, "prompt", txt="Prompt"),
    "icon": lambda: layout.operator("syncsphere.generate", icon="RENDER_STIL"),
    "operator": lambda: layout.operator("syncsphere.generat"),
    "operator property": lambda: setattr(layout.operator("syncsphere.history_apply"), "indx", 1),
    "index": lambda: layout.prop(settings, "seed", index=2),
    "missing": lambda: layout.prop(settings),
    "enum item": lambda: layout.prop_enum(settings, "mode", "WORLDS"),
}
failures = {}
for name, attempt in attempts.items():
    try:
        attempt()
    except AssertionError as error:
        failures[name] = str(error)
# And what is right passes, returning layouts and operator properties like the real one.
row = layout.row(align=True)
row.prop(settings, "seed")
row.prop_enum(settings, "mode", "TILE")
row.operator("syncsphere.history_apply", text="Apply").index = 3
row.use_property_split = True
assert row.use_property_split is True and layout.use_property_split is False
assert layout.label(text="x", icon="INFO") is None
result(failures)
""", tmp_path)
    assert set(failures) == {"method", "attribute", "property", "argument", "icon", "operator",
                             "operator property", "index", "missing", "enum item"}, failures
    assert "promt" in failures["property"] and "propp" in failures["method"]


# --- the main panel --------------------------------------------------------------------------------


def test_every_setting_is_drawn_and_generate_is_shown_when_idle(tmp_path):
    report = _blender("""
settings.mode = "WORLD"
registered = sorted(name for name in settings.bl_rna.properties.keys()
                    if name not in ("rna_type", "name", "history", "history_index"))
assert (settings.sync_method, settings.quality) == ("AUTO", "BALANCED")  # the defaults
by_method = {}
for method in ("AUTO", "MULTIDIFFUSION", "SYNCSDE", "SYNCDIFFUSION"):
    settings.sync_method = method
    by_method[method] = draw_all()
settings.resolution, settings.start_image_source = "CUSTOM", "FILE"
with_image = draw("SYNCSPHERE_PT_view3d")
settings.start_image_source = "WORLD"
with_world_image = draw("SYNCSPHERE_PT_view3d")
result({"registered": registered, "by method": by_method, "with image": with_image, "with world image": with_world_image,
        "parents": {cls.bl_idname: getattr(cls, "bl_parent_id", "") for cls in panels._CLASSES}})
""", tmp_path)
    # The list above is the whole of SyncSphereSettings' user settings: a new one must be added there.
    assert set(report["registered"]) == SETTINGS
    # Each method draws everything but the other methods' options; together they draw every setting.
    every_method = set()
    for method, drawn in report["by method"].items():
        others = {name for other, names in METHOD_SETTINGS.items() if other != method for name in names}
        for location in ("world", "view3d"):
            everything = [call for idname, calls in drawn.items()
                          if idname.startswith(f"SYNCSPHERE_PT_{location}") for call in calls]
            settings_drawn = _props(everything, "settings")
            expected = SETTINGS - others - CONDITIONAL_IMAGE_SETTINGS
            assert set(settings_drawn) == expected, (method, set(settings_drawn) ^ expected)
            assert len(settings_drawn) == len(set(settings_drawn)), "a setting is drawn twice"
            every_method |= set(settings_drawn)
    assert every_method == SETTINGS - CONDITIONAL_IMAGE_SETTINGS
    assert _main_rows(report["with image"]) == MAIN_ROWS_WITH_IMAGE
    assert next(call for call in report["with image"] if call["args"].get("property") == "resolution")["args"]["text"] == "Size"
    assert _main_rows(report["with world image"]) == [row for row in MAIN_ROWS_WITH_IMAGE if row != "start_image_path"]
    drawn = report["by method"]["SYNCDIFFUSION"]
    assert set(drawn) == {f"SYNCSPHERE_PT_{location}{sub}" for location in ("world", "view3d")
                          for sub in ("", "_result", "_lighting", "_advanced", "_history", "_backend")}
    for location in ("world", "view3d"):
        main = f"SYNCSPHERE_PT_{location}"
        assert all(report["parents"][f"{main}_{sub}"] == main
                   for sub in ("result", "lighting", "advanced", "history", "backend"))

        calls = drawn[main]
        assert "syncsphere.generate" in _operators(calls) and "syncsphere.cancel" not in _operators(calls)
        assert not [call for call in calls if call["method"] == "progress"]
        assert [call["args"] for call in calls if call["method"] == "prop" and call["args"]["property"] == "mode"] \
            == [{"data": "settings", "property": "mode", "expand": True}]
        size = next(call for call in calls if call["args"].get("property") == "resolution")
        assert size["args"]["text"] == "Size (1024x512)"
        assert _main_rows(calls) == MAIN_ROWS
        # The backend is configured: no hint to set it.
        assert not _notes(calls)

        assert set(_props(drawn[f"{main}_result"], "settings")) == {"hide_from_camera", "face_camera", "preview_in_world"}
        assert "syncsphere.restore_world" in _operators(drawn[f"{main}_result"])
        assert _props(drawn[f"{main}_advanced"], "settings") == \
            ADVANCED_SETTINGS[:6] + SYNCDIFFUSION_SETTINGS + ADVANCED_SETTINGS[6:]
        assert _props(drawn[f"{main}_backend"], "prefs") == ["default_model_menu", "default_model", "python_path"]
        assert set(_operators(drawn[f"{main}_backend"])) == {"syncsphere.check_backend",
                                                             "syncsphere.open_output_folder"}


def test_the_style_menu_fills_the_style_prompt_and_avoid_which_stay_editable(tmp_path):
    """The Style menu (the apply_style operator's, run for real) fills Style Prompt and Avoid with the preset's
    words, which the main panel shows under it and Generate sends after the prompt; edited, the edit is sent; the
    history keeps the style and Reuse gives it back; None clears both."""
    report = _blender("""
from syncsphere.blender_addon.core import generation
settings.prompt = "a harbour at dusk"
properties = settings.bl_rna.properties
report = {"default": [settings.style, settings.style_prompt, settings.negative_prompt],
          "items": [[item.identifier, item.name, item.description] for item in properties["style"].enum_items],
          "labels": [properties[name].name for name in ("style", "style_prompt")]}
assert bpy.ops.syncsphere.apply_style(style="PAINTERLY") == {"FINISHED"}
report["painterly"] = [settings.style, settings.style_prompt, settings.negative_prompt]
report["drawn"] = draw("SYNCSPHERE_PT_world")
report["sent"] = generation.generate_params(settings, 7, model="m", device="cpu")
settings.style_prompt = "watercolour wash"  # the artist edits what the style added
report["edited"] = generation.generate_params(settings, 7, model="m", device="cpu")["prompt"]
results.add_history(settings, 7, {"png": "", "exr": ""})
assert bpy.ops.syncsphere.apply_style(style="NONE") == {"FINISHED"}
report["none"] = [settings.style, settings.style_prompt, settings.negative_prompt]
report["none sent"] = generation.generate_params(settings, 7, model="m", device="cpu")["prompt"]
results.reuse_settings(settings, settings.history[0])
report["reused"] = [settings.style, settings.style_prompt, settings.negative_prompt]
result(report)
""", tmp_path)
    from syncsphere.blender_addon.core import generation

    assert report["default"] == ["NONE", "", ""]
    assert [item[:2] for item in report["items"]] == [[identifier, name] for identifier, name, *_ in generation.STYLES]
    assert report["labels"] == ["Style", "Style Prompt"]
    painterly, avoid = generation.STYLE_TEXTS["PAINTERLY"]
    assert report["painterly"] == ["PAINTERLY", painterly, avoid]
    calls = report["drawn"]
    menu = next(call for call in calls if call["method"] == "operator_menu_enum")
    assert menu["args"] == {"operator": "syncsphere.apply_style", "property": "style", "text": "Painterly"}
    label = calls[menu["index"] - 1]  # the menu's own label, to its left
    assert label["method"] == "label" and label["args"]["text"] == "Style"
    drawn = _main_rows(calls)
    assert drawn[drawn.index("style") + 1:drawn.index("style") + 3] == ["style_prompt", "negative_prompt"]
    avoid_call = next(call for call in calls if call["args"].get("property") == "negative_prompt")
    assert avoid_call["args"]["text"] == "Avoid"
    assert report["sent"]["prompt"] == f"a harbour at dusk, {painterly}" and report["sent"]["negative_prompt"] == avoid
    assert report["edited"] == "a harbour at dusk, watercolour wash"
    assert report["none"] == ["NONE", "", ""] and report["none sent"] == "a harbour at dusk"
    assert report["reused"] == ["PAINTERLY", "watercolour wash", avoid]


def test_every_control_the_backends_messages_are_translated_to_is_drawn_under_that_label(tmp_path):
    """panel_words.CONTROLS, checked against the panels as drawn: each label path ("Advanced › Window") names the
    sub-panel that draws the flag's setting and the label it is drawn with, and each value's name is the name of
    one of the setting's items."""
    report = _blender("""
from syncsphere.blender_addon.scene import preferences
settings.mode, settings.hdr, settings.use_sun_direction = "WORLD", True, True
settings.start_image_source = "FILE"  # Image File and Strength are drawn only with a start image
settings.extend_photo = True  # and Extend Photo's file, field of view, yaw and pitch only when it is on
drawn = {}
for method in ("SYNCDIFFUSION", "SYNCSDE"):  # each method's own options are drawn only with it
    settings.sync_method = method
    for place, idname in (("", "SYNCSPHERE_PT_world"), ("Advanced", "SYNCSPHERE_PT_world_advanced"),
                          ("Lighting", "SYNCSPHERE_PT_world_lighting"), ("Backend", "SYNCSPHERE_PT_world_backend")):
        for call in draw(idname):
            if call["method"] == "prop":
                data, name = call["args"]["data"], call["args"]["property"]
                owner = settings if data == "settings" else prefs
                label = call["args"].get("text") or owner.bl_rna.properties[name].name
                drawn.setdefault(place, {})[data + ":" + name] = label
calls = []
preferences.draw_preferences(RecordingLayout(calls), prefs)
drawn["SyncSphere Preferences"] = {"prefs:" + call["args"]["property"]: prefs.bl_rna.properties[call["args"]["property"]].name
                                   for call in calls if call["method"] == "prop"}
items = {}
for data, owner in (("settings", settings), ("prefs", prefs)):
    for name, prop in owner.bl_rna.properties.items():
        if prop.type == "ENUM" and not prop.is_enum_flag:
            items[data + ":" + name] = [item.name for item in prop.enum_items]
result({"drawn": drawn, "items": items})
""", tmp_path)
    from syncsphere.blender_addon.core.panel_words import CONTROLS

    for flag, control in CONTROLS.items():
        place, _, label = control.label.rpartition(" › ")
        key = f"{control.data}:{control.setting}"
        assert key in report["drawn"][place], (flag, place)
        drawn_label = report["drawn"][place][key]
        # Size is drawn with the size in pixels after it: "Size (1024x512)".
        assert drawn_label == label or drawn_label.startswith(label + " ("), (flag, drawn_label, label)
        for value, name in control.values.items():
            if name is not None:
                assert name in report["items"][key], (flag, value, name)


def test_main_panel_follows_the_batch_and_the_preferences(tmp_path):
    """Busy: progress (which variation, when several) and Cancel instead of Generate, also between two variations.
    Failed: Generate and the error. Variations 4: "Generate 4". No backend: the first-run steps."""
    states = _blender("""
def main_calls():
    return draw("SYNCSPHERE_PT_view3d")

def summary(calls):
    return {"operators": [[call["args"]["operator"], call["args"].get("text")] for call in calls
                          if call["method"] == "operator"],
            "progress": [call["args"] for call in calls if call["method"] == "progress"],
            "labels": [call["args"] for call in calls if call["method"] == "label"]}

states = {}
settings.mode = "TILE"
states["tile size"] = [call["args"]["text"] for call in main_calls() if call["args"].get("property") == "resolution"]
def batch(count=1, started=1, **state):
    # A real Batch of ``count`` variations, ``started`` of them started, the last one's GenerationJob in the
    # given state, as its events would leave it (no worker behind it).
    made = session.Batch(None, [(seed, {}, os.path.abspath("out")) for seed in range(count)])
    made.job, made.started = session.GenerationJob(None, {}, os.path.abspath("out")), started
    for name, value in state.items():
        setattr(made.job, name, value)
    return made

session._batch = batch(state="running", stage="denoising", step=3, total=10)
states["denoising"] = summary(main_calls())
session._batch = batch(state="running", stage="denoising", step=4, total=10, seconds_per_step=0.83)
states["timed"] = summary(main_calls())
session._batch = batch(state="running", stage="loading", step=0, total=1)
states["loading"] = summary(main_calls())
session._batch = batch(count=4, started=2, state="running", stage="denoising", step=3, total=10)
states["variation"] = summary(main_calls())
session._batch = batch(count=4, started=2, state="done", stage="writing", step=1, total=1)
states["between variations"] = summary(main_calls())
session._batch = batch(state="error", stage="denoising", step=1, total=10, error="The model could not be loaded")
states["error"] = summary(main_calls())
session._batch = None
settings.variations = 4
states["four"] = summary(main_calls())
prefs.python_path = "  "
states["no backend"] = summary(main_calls())
result(states)
""", tmp_path)
    def notes(state):  # the labels but the Style menu's own
        return [label for label in state["labels"] if label["text"] != "Style"]

    assert states["tile size"] == ["Size (512x512)"]
    assert states["denoising"]["operators"] == [["syncsphere.cancel", None]]
    assert states["denoising"]["progress"] == [{"factor": 0.3, "text": "Denoising 3/10"}]
    assert states["timed"]["progress"] == [{"factor": 0.4, "text": "Denoising 4/10 · 0.83 s/step"}]
    assert states["loading"]["operators"] == [["syncsphere.cancel", None]]
    assert states["loading"]["progress"] == [{"factor": 0.0, "text": "Loading"}]
    assert states["variation"]["progress"] == [{"factor": 0.3, "text": "Variation 2/4 · Denoising 3/10"}]
    assert states["between variations"]["operators"] == [["syncsphere.cancel", None]]  # two more to start
    assert states["error"]["operators"] == [["syncsphere.generate", "Generate"]] and not states["error"]["progress"]
    assert notes(states["error"]) == [{"text": "The model could not be loaded", "icon": "ERROR"}]
    assert states["four"]["operators"] == [["syncsphere.generate", "Generate 4"]] and not notes(states["four"])
    # No backend: the first-run steps lead to Set Up Backend (tests/test_blender_first_run.py); Generate stays.
    assert states["no backend"]["operators"][0][0] == "syncsphere.setup_backend"
    assert states["no backend"]["operators"][-1] == ["syncsphere.generate", "Generate 4"]
    assert notes(states["no backend"])[0]["text"] == "1. Set up the backend"


def test_syncdiffusion_options_appear_under_the_synchronisation_menu_only_when_chosen(tmp_path):
    report = _blender("""
report = {}
for method in ("MULTIDIFFUSION", "SYNCDIFFUSION", "MULTIDIFFUSION"):
    settings.sync_method = method
    report.setdefault(method, []).append(draw("SYNCSPHERE_PT_world_advanced"))
report["labels"] = {name: [settings.bl_rna.properties[name].name, settings.bl_rna.properties[name].description]
                    for name in ("sync_method", "sync_weight", "sync_steps", "sync_fast")}
report["items"] = [[item.identifier, item.name, item.description]
                   for item in settings.bl_rna.properties["sync_method"].enum_items]
result(report)
""", tmp_path)
    for calls in report["MULTIDIFFUSION"]:  # before and after choosing SyncDiffusion once
        drawn = _props(calls, "settings")
        assert "sync_method" in drawn and not set(drawn) & set(SYNCDIFFUSION_SETTINGS), drawn
    calls = report["SYNCDIFFUSION"][0]
    drawn = _props(calls, "settings")
    at = drawn.index("sync_method")
    assert drawn[at + 1:at + 4] == SYNCDIFFUSION_SETTINGS, drawn
    # In the same property-split column as the Synchronisation menu, with their own names as labels.
    props = {call["args"]["property"]: call for call in calls if call["method"] == "prop"}
    assert {props[name]["path"] for name in ["sync_method"] + SYNCDIFFUSION_SETTINGS} == {props["sync_method"]["path"]}
    assert all(set(props[name]["args"]) == {"data", "property"} for name in SYNCDIFFUSION_SETTINGS)
    # Everything else is drawn exactly as with MultiDiffusion.
    others = [call["args"] for call in calls if call["args"].get("property") not in SYNCDIFFUSION_SETTINGS]
    assert others == [call["args"] for call in report["MULTIDIFFUSION"][0]]
    labels = report["labels"]
    assert [labels[name][0] for name in SYNCDIFFUSION_SETTINGS] == ["Coherence Strength", "Guided Steps", "Fast Guidance"]
    assert "taesd" in labels["sync_fast"][1] and "0" in labels["sync_steps"][1]
    assert [item[:2] for item in report["items"]] == [["AUTO", "From Quality"], ["MULTIDIFFUSION", "MultiDiffusion"],
                                                      ["SYNCDIFFUSION", "SyncDiffusion"], ["SYNCSDE", "SyncSDE"]]
    assert "Quality" in report["items"][0][2]
    assert "coherent" in report["items"][2][2] and "slower" in report["items"][2][2]
    assert "neighbours" in report["items"][3][2] and "fast" in report["items"][3][2] and "dense" in report["items"][3][2]


def test_syncsde_pull_strength_appears_only_when_chosen_and_merged_attention_always(tmp_path):
    report = _blender("""
report = {}
for method in ("MULTIDIFFUSION", "SYNCSDE", "SYNCDIFFUSION", "AUTO", "SYNCSDE", "SYNCDIFFUSION", "MULTIDIFFUSION", "AUTO"):
    settings.sync_method = method
    report.setdefault(method, []).append(draw("SYNCSPHERE_PT_view3d_advanced"))
settings.mad = True
report["mad on"] = draw("SYNCSPHERE_PT_view3d_advanced")
properties = settings.bl_rna.properties
report["labels"] = {name: [properties[name].name, properties[name].description] for name in ("syncsde_lambda", "mad")}
report["range"] = [properties["syncsde_lambda"].hard_min, properties["syncsde_lambda"].soft_max]
report["defaults"] = [properties["syncsde_lambda"].default, properties["mad"].default]
result(report)
""", tmp_path)
    for method, calls_of_method in report.items():
        if method not in METHOD_SETTINGS:
            continue
        for calls in calls_of_method:  # the same before and after another method
            drawn = _props(calls, "settings")
            at = drawn.index("sync_method")
            own = METHOD_SETTINGS[method]
            # The method's own options right under the menu, then Merged Attention whatever the method.
            assert drawn[at + 1:at + 2 + len(own)] == own + ["mad"], (method, drawn)
            assert drawn.count("mad") == 1
            if method != "SYNCSDE":
                assert "syncsde_lambda" not in drawn, (method, drawn)
            # In the Synchronisation menu's property-split column, with their own names as labels.
            props = {call["args"]["property"]: call for call in calls if call["method"] == "prop"}
            assert {props[name]["path"] for name in ["sync_method", "mad"] + own} == {props["sync_method"]["path"]}
            assert all(set(props[name]["args"]) == {"data", "property"} for name in ["mad"] + own)
        assert calls_of_method[0] == calls_of_method[-1]
    assert report["mad on"] == report["MULTIDIFFUSION"][0]  # a checkbox: drawn the same on and off
    labels = report["labels"]
    assert [labels[name][0] for name in ("syncsde_lambda", "mad")] == ["Pull Strength", "Merged Attention"]
    assert "neighbours" in labels["syncsde_lambda"][1] and "0" in labels["syncsde_lambda"][1]
    assert "30%" in labels["mad"][1] and "15 of 50" in labels["mad"][1] and "memory" in labels["mad"][1]
    assert report["range"] == [0.0, 20.0]
    assert report["defaults"] == [5.0, False]


def test_the_real_settings_send_syncsde_and_merged_attention_and_the_history_keeps_them(tmp_path):
    """generation.generate_params on the registered settings (their real defaults), and the history keeping
    and giving back (Reuse) SyncSDE's pull strength and merged attention."""
    report = _blender("""
from syncsphere.blender_addon.core import generation
report = {"default": generation.generate_params(settings, 7, model="m", device="cpu")}
settings.sync_method = "SYNCSDE"
report["syncsde"] = generation.generate_params(settings, 7, model="m", device="cpu")
settings.syncsde_lambda, settings.mad, settings.steps = 12.5, True, 50
report["syncsde, mad"] = generation.generate_params(settings, 7, model="m", device="cpu")
results.add_history(settings, 7, {"png": "", "exr": ""})
settings.sync_method, settings.syncsde_lambda, settings.mad = "MULTIDIFFUSION", 1.0, False
results.add_history(settings, 8, {"png": "", "exr": ""})
# An item recorded before these settings existed: the properties' defaults (it ran dense MultiDiffusion).
old = settings.history.add()
report["old item"] = [old.syncsde_lambda, old.mad, old.quality, old.sync_method, old.run_summary]
settings.history.remove(len(settings.history) - 1)
report["history"] = [[item.sync_method, item.syncsde_lambda, item.mad] for item in settings.history]
report["history labels"] = [call["args"]["text"] for call in draw("SYNCSPHERE_PT_world_history") if call["method"] == "label"]
results.reuse_settings(settings, settings.history[1])
report["reused"] = [settings.sync_method, settings.syncsde_lambda, settings.mad, settings.seed]
result(report)
""", tmp_path)
    # The defaults: Balanced (the backend's measured default: nothing sent), Synchronisation From Quality.
    picked = {name: value for name, value in report["default"].items() if name.startswith(("sync", "mad", "schedule"))}
    assert picked == {}
    picked = {name: value for name, value in report["syncsde"].items() if name.startswith(("sync", "mad", "schedule"))}
    # The property's default; no schedule under Balanced (the backend's auto, which runs SyncSDE dense).
    assert picked == {"sync": "syncsde", "syncsde_lambda": 5.0}
    picked = {name: value for name, value in report["syncsde, mad"].items() if name.startswith(("sync", "mad"))}
    assert picked == {"sync": "syncsde", "syncsde_lambda": 12.5, "mad_steps": 15}
    assert report["old item"] == [5.0, False, "BEST", "MULTIDIFFUSION", ""]
    assert report["history"] == [["MULTIDIFFUSION", 1.0, False], ["SYNCSDE", 12.5, True]]
    labels = report["history labels"]
    assert labels[1] == "Seed 8, world, Balanced, MultiDiffusion" and labels[3] == "Seed 7, world, Balanced, SyncSDE"
    assert report["reused"] == ["SYNCSDE", 12.5, True, 7]


def test_the_real_settings_send_syncdiffusion_only_when_chosen(tmp_path):
    """generation.generate_params on the registered settings (their real defaults), and the history keeping
    and giving back the synchronisation settings (Reuse)."""
    report = _blender("""
from syncsphere.blender_addon.core import generation
report = {"default": generation.generate_params(settings, 7, model="m", device="cpu")}
settings.sync_method = "SYNCDIFFUSION"
report["syncdiffusion"] = generation.generate_params(settings, 7, model="m", device="cpu")
settings.sync_weight, settings.sync_steps, settings.sync_fast = 31.5, 0, True
report["every step, fast"] = generation.generate_params(settings, 7, model="m", device="cpu")
report["ranges"] = {name: [settings.bl_rna.properties[name].hard_min, settings.bl_rna.properties[name].soft_max]
                    for name in ("sync_weight", "sync_steps")}
results.add_history(settings, 7, {"png": "", "exr": ""})
settings.sync_method, settings.sync_weight, settings.sync_steps, settings.sync_fast = "MULTIDIFFUSION", 1.0, 3, False
results.add_history(settings, 8, {"png": "", "exr": ""})
report["history"] = [[item.sync_method, item.sync_weight, item.sync_steps, item.sync_fast] for item in settings.history]
report["history labels"] = [[call["args"]["text"] for call in draw("SYNCSPHERE_PT_world_history") if call["method"] == "label"]]
results.reuse_settings(settings, settings.history[1])
report["reused"] = [settings.sync_method, settings.sync_weight, settings.sync_steps, settings.sync_fast, settings.seed]
result(report)
""", tmp_path)
    # Balanced (From Quality) sends no synchronisation: the backend's measured default.
    assert {name: value for name, value in report["default"].items() if name.startswith("sync")} == {}
    sync = {name: value for name, value in report["syncdiffusion"].items() if name.startswith("sync")}
    assert sync == {"sync": "syncdiffusion", "sync_weight": 20.0, "sync_steps": 10}  # the properties' defaults
    sync = {name: value for name, value in report["every step, fast"].items() if name.startswith("sync")}
    assert sync == {"sync": "syncdiffusion", "sync_weight": 31.5, "sync_decoder": "taesd", "sync_reuse_eps": True,
                    "sync_loss_size": 256}
    assert report["ranges"]["sync_weight"] == [0.0, 40.0] and report["ranges"]["sync_steps"][0] == 0
    assert report["history"] == [["MULTIDIFFUSION", 1.0, 3, False], ["SYNCDIFFUSION", 31.5, 0, True]]
    labels = report["history labels"][0]
    assert labels[1] == "Seed 8, world, Balanced, MultiDiffusion" and labels[3] == "Seed 7, world, Balanced, SyncDiffusion"
    assert report["reused"] == ["SYNCDIFFUSION", 31.5, 0, True, 7]


def test_the_view_set_and_sky_and_ground_prompts_appear_in_advanced_only_for_a_world(tmp_path):
    report = _blender("""
report = {}
for mode in ("WORLD", "TILE", "WIDE", "WORLD"):
    settings.mode = mode
    report.setdefault(mode, []).append(draw("SYNCSPHERE_PT_view3d_advanced"))
report["labels"] = {name: [settings.bl_rna.properties[name].name, settings.bl_rna.properties[name].description]
                    for name in ("view_set", "prompt_up", "prompt_down")}
report["items"] = [[item.identifier, item.name, item.description]
                   for item in settings.bl_rna.properties["view_set"].enum_items]
report["defaults"] = [settings.view_set, settings.prompt_up, settings.prompt_down]
result(report)
""", tmp_path)
    for mode in ("TILE", "WIDE"):
        drawn = _props(report[mode][0], "settings")
        assert "guidance" in drawn and not set(drawn) & set(WORLD_VIEW_SETTINGS), drawn
    for calls in report["WORLD"]:  # before and after another mode
        drawn = _props(calls, "settings")
        at = drawn.index("guidance")
        assert drawn[at + 1:at + 4] == WORLD_VIEW_SETTINGS, drawn
        # In Advanced's property-split column, with their own names as labels.
        props = {call["args"]["property"]: call for call in calls if call["method"] == "prop"}
        assert {props[name]["path"] for name in ["steps"] + WORLD_VIEW_SETTINGS} == {props["steps"]["path"]}
        assert all(set(props[name]["args"]) == {"data", "property"} for name in WORLD_VIEW_SETTINGS)
    assert report["WORLD"][0] == report["WORLD"][1]
    assert report["defaults"] == ["AUTO", "", ""]
    labels = report["labels"]
    assert [labels[name][0] for name in WORLD_VIEW_SETTINGS] == ["View Set", "Sky Prompt", "Ground Prompt"]
    assert "look up" in labels["prompt_up"][1] and "look down" in labels["prompt_down"][1]
    assert [item[:2] for item in report["items"]] == [["AUTO", "Automatic"], ["BAND", "Band"],
                                                      ["BAND_POLES", "Band + Poles"], ["RING", "Ring"], ["CUBE", "Cube"]]
    assert all(item[2] for item in report["items"])


def test_the_real_settings_send_the_view_set_only_for_a_world_and_the_history_keeps_it(tmp_path):
    """generation.generate_params on the registered settings, and the history keeping and giving back
    (Reuse) the view set and the sky / ground prompts."""
    report = _blender("""
from syncsphere.blender_addon.core import generation
settings.mode = "WORLD"
report = {"default": generation.generate_params(settings, 7, model="m", device="cpu")}
settings.view_set, settings.prompt_up, settings.prompt_down = "BAND_POLES", "clear blue sky", " "
report["world"] = generation.generate_params(settings, 7, model="m", device="cpu")
results.add_history(settings, 7, {"png": "", "exr": ""})
settings.mode = "TILE"
report["tile"] = generation.generate_params(settings, 8, model="m", device="cpu")
settings.view_set, settings.prompt_up, settings.prompt_down = "AUTO", "", "grass"
results.add_history(settings, 8, {"png": "", "exr": ""})
report["history"] = [[item.mode, item.view_set, item.prompt_up, item.prompt_down] for item in settings.history]
results.reuse_settings(settings, settings.history[1])
report["reused"] = [settings.mode, settings.view_set, settings.prompt_up, settings.prompt_down, settings.seed]
result(report)
""", tmp_path)
    views = ("views", "prompt_up", "prompt_down")
    assert not set(report["default"]) & set(views)
    assert {name: report["world"][name] for name in views if name in report["world"]} == \
        {"views": "band+poles", "prompt_up": "clear blue sky"}
    assert not set(report["tile"]) & set(views)
    assert report["history"] == [["TILE", "AUTO", "", "grass"], ["WORLD", "BAND_POLES", "clear blue sky", " "]]
    assert report["reused"] == ["WORLD", "BAND_POLES", "clear blue sky", " ", 7]


def test_quality_is_drawn_under_the_size_sends_its_table_and_notes_a_dense_schedule(tmp_path):
    """Quality's items are the core table's (generation.QUALITIES), Balanced by default; each sends its table
    entry from the registered settings; an Advanced Stride or SyncSDE makes Fast's schedule dense with a note
    under Quality; the history keeps the quality and Reuse gives it back."""
    report = _blender("""
from syncsphere.blender_addon.core import generation
properties = settings.bl_rna.properties
report = {"default": settings.quality, "label": properties["quality"].name,
          "items": [[item.identifier, item.name, item.description] for item in properties["quality"].enum_items],
          "table": [[identifier, name, description] for identifier, name, description, _ in generation.QUALITIES],
          "sent": {}}
for quality in ("FAST", "BALANCED", "BEST"):
    settings.quality = quality
    report["sent"][quality] = generation.generate_params(settings, 7, model="m", device="cpu")
settings.quality = "FAST"
report["plain"] = draw("SYNCSPHERE_PT_view3d")
settings.stride = 8
report["stride"] = draw("SYNCSPHERE_PT_view3d")
report["stride sent"] = generation.generate_params(settings, 7, model="m", device="cpu")
settings.stride, settings.sync_method = 0, "SYNCSDE"
report["syncsde"] = draw("SYNCSPHERE_PT_world")
results.add_history(settings, 7, {"png": "", "exr": ""})
settings.quality, settings.sync_method = "BEST", "AUTO"
results.reuse_settings(settings, settings.history[0])
report["reused"] = [settings.quality, settings.sync_method]
result(report)
""", tmp_path)
    assert report["default"] == "BALANCED" and report["label"] == "Quality"
    assert report["items"] == report["table"]
    assert [item[:2] for item in report["items"]] == [["FAST", "Fast"], ["BALANCED", "Balanced"], ["BEST", "Best"]]
    for quality, params in report["sent"].items():
        table = {"FAST": {"schedule": "shifted"},
                 "BALANCED": {"schedule": None, "sync": None, "sync_steps": None},  # nothing: the backend's default
                 "BEST": {"schedule": "dense"}}[quality]
        assert {name: params.get(name) for name in table} == table, (quality, params)
    assert not _notes(report["plain"])
    assert report["stride sent"]["schedule"] == "dense" and report["stride sent"]["stride"] == 8
    for case in ("stride", "syncsde"):
        calls = report[case]
        labels = _notes(calls)
        assert len(labels) == 1 and labels[0]["args"]["icon"] == "INFO" and "Dense" in labels[0]["args"]["text"]
        quality = next(call for call in calls if call["args"].get("property") == "quality")
        assert labels[0]["path"] == quality["path"] and labels[0]["index"] == quality["index"] + 1  # right under it
    assert report["reused"] == ["FAST", "SYNCSDE"]


# --- the Result sub-panel -------------------------------------------------------------------------------


def test_result_panel_draws_the_syncsphere_worlds_own_sockets(tmp_path):
    report = _blender("""
settings.mode = "WORLD"
report = {"user world": draw("SYNCSPHERE_PT_world_result")}
exr = write_exr(os.path.join(TMP, "grey.exr"), np.full((4, 8, 3), 0.5, np.float32))
for hide in (False, True):
    new_world = W.apply_world(context, exr, rotation=0.25, strength=2.0, hide_from_camera=hide)
    assert scene.world == new_world
    nodes = new_world.node_tree.nodes
    TARGETS.clear()
    TARGETS["rotation"] = nodes[W.MAPPING_NODE].inputs["Rotation"]
    TARGETS["strength"] = nodes[W.BACKGROUND_NODE].inputs["Strength"]
    if hide:
        TARGETS["camera strength"] = nodes[W.CAMERA_BACKGROUND_NODE].inputs["Strength"]
    report[f"hide {hide}"] = draw("SYNCSPHERE_PT_view3d_result")
result(report)
""", tmp_path)
    # A World that is not SyncSphere's: only the options and Restore.
    assert _props(report["user world"], "settings") == ["hide_from_camera", "face_camera", "preview_in_world"]
    assert [call for call in report["user world"] if call["method"] == "prop"
            and call["args"]["data"] not in ("settings",)] == []
    for hide in (False, True):
        calls = report[f"hide {hide}"]
        sockets = [call["args"] for call in calls if call["method"] == "prop" and call["args"]["data"] != "settings"]
        assert sockets == [
            {"data": "rotation", "property": "default_value", "index": 2, "text": "Rotation"},
            {"data": "strength", "property": "default_value", "index": -1, "text": "Strength"},
        ]
        assert _props(calls, "settings") == ["hide_from_camera", "face_camera", "preview_in_world"]
        assert _operators(calls) == ["syncsphere.export_cubemap", "syncsphere.restore_world"]


def test_a_syncsphere_world_whose_nodes_the_user_deleted_still_draws(tmp_path):
    """The panels find the World's sockets through world.py's accessors: with the Mapping node deleted every
    panel draws (no KeyError), the Result panel says the rotation is gone and still draws the strength; with the
    Background deleted too, it says so for both. The getters and setters report the missing nodes."""
    report = _blender("""
settings.mode = "WORLD"
exr = write_exr(os.path.join(TMP, "grey.exr"), np.full((4, 8, 3), 0.5, np.float32))
new_world = W.apply_world(context, exr, rotation=0.25, strength=2.0)
nodes = new_world.node_tree.nodes
nodes.remove(nodes[W.MAPPING_NODE])
TARGETS["strength"] = nodes[W.BACKGROUND_NODE].inputs["Strength"]
report = {"no mapping": draw_all()["SYNCSPHERE_PT_world_result"],
          "rotation": W.world_rotation(new_world), "rotation set": W.set_world_rotation(new_world, 1.0)}
TARGETS.clear()  # before the node goes: the recording compares what is drawn with these sockets
nodes.remove(nodes[W.BACKGROUND_NODE])
report["no background"] = draw_all()["SYNCSPHERE_PT_view3d_result"]
report["strength"] = W.world_strength(new_world)
report["strength set"] = W.set_world_strength(new_world, 3.0)
result(report)
""", tmp_path)
    def sockets(calls):
        return [call["args"] for call in calls if call["method"] == "prop" and call["args"]["data"] != "settings"]

    def notes(calls):
        return [call["args"]["text"] for call in calls if call["method"] == "label"]

    assert sockets(report["no mapping"]) == [{"data": "strength", "property": "default_value", "index": -1,
                                              "text": "Strength"}]
    assert notes(report["no mapping"]) == ["Rotation: its SyncSphere node was deleted"]
    assert sockets(report["no background"]) == []
    assert notes(report["no background"]) == ["Rotation: its SyncSphere node was deleted",
                                              "Strength: its SyncSphere node was deleted"]
    for calls in (report["no mapping"], report["no background"]):
        assert _props(calls, "settings") == ["hide_from_camera", "face_camera", "preview_in_world"]
        assert _operators(calls) == ["syncsphere.export_cubemap", "syncsphere.restore_world"]
    assert (report["rotation"], report["rotation set"], report["strength"], report["strength set"]) == (0.0, False, 1.0, False)


def test_result_panel_draws_the_tiling_of_the_active_material(tmp_path):
    report = _blender("""
cube = context.active_object
assert cube is not None and cube.type == "MESH" and cube.active_material.name == "Material"
settings.mode = "TILE"
report = {"user material": draw("SYNCSPHERE_PT_world_result")}
context.view_layer.objects.active = None
report["no object"] = draw("SYNCSPHERE_PT_world_result")
context.view_layer.objects.active = cube
new_material = material.apply_tile_texture(cube, write_png("tile.png"), scale=3.0)
TARGETS["tiling"] = new_material.node_tree.nodes[material.MAPPING_NODE].inputs["Scale"]
report["syncsphere material"] = draw("SYNCSPHERE_PT_world_result")
settings.mode = "WIDE"
report["wide"] = draw("SYNCSPHERE_PT_world_result")
result(report)
""", tmp_path)
    # The default cube's own material, and no active object: where the texture would go.
    for case in ("user material", "no object"):
        assert [call["method"] for call in report[case]] == ["column", "label", "operator"]
        assert "active object" in report[case][1]["args"]["text"]
        assert report[case][2]["args"]["operator"] == "syncsphere.bake_to_uv"
    props = [call["args"] for call in report["syncsphere material"] if call["method"] == "prop"]
    assert props == [{"data": "tiling", "property": "default_value", "text": "Tiling"}]
    assert [call["method"] for call in report["wide"]] == ["column", "label"]
    assert "Image Editor" in report["wide"][1]["args"]["text"]


# --- the History sub-panel -----------------------------------------------------------------------------


def test_history_panel_draws_one_box_per_item_with_apply_reuse_and_upscale(tmp_path):
    report = _blender("""
report = {"empty": draw("SYNCSPHERE_PT_world_history")}
# Three generations, oldest first; add_history puts each new one on top.
for number, mode in enumerate(("WORLD", "TILE", "WIDE")):
    settings.prompt, settings.mode = f"prompt {number}", mode
    png = write_png(f"item{number}.png")
    results.add_history(settings, 100 + number, {"png": png, "exr": png.replace(".png", ".exr")})
# Thumbnails are never rendered in background mode (icon 0, so no template_icon): check that the real
# function copes, then let the panel see an icon per existing file to draw that branch too.
report["real icons"] = [results.thumbnail_icon(item.png_path) for item in settings.history]
report["missing icon"] = results.thumbnail_icon(os.path.join(TMP, "gone.png"))
report["without icons"] = draw("SYNCSPHERE_PT_world_history")
panels.thumbnail_icon = lambda path: 1000 + int(path[-5]) if os.path.isfile(path) else 0
os.remove(settings.history[1].png_path)  # the middle item's file is gone: no thumbnail, still a box
report["items"] = draw("SYNCSPHERE_PT_view3d_history")
for number in range(3, 10):
    settings.prompt = f"prompt {number}"
    results.add_history(settings, 100 + number, {"png": "", "exr": ""})
report["ten"] = draw("SYNCSPHERE_PT_view3d_history")
# A job whose metadata.json says how it ran: its item says so under the seed.
metadata = os.path.join(TMP, "metadata.json")
with open(metadata, "w") as file:
    json.dump({"schedule": "shifted", "views_per_step": {"mean": 2.5, "min": 2, "max": 3}}, file)
settings.prompt, settings.quality, settings.sync_method = "prompt 10", "FAST", "SYNCSDE"
results.add_history(settings, 110, {"png": "", "exr": "", "metadata": metadata})
report["summary"] = draw("SYNCSPHERE_PT_world_history")
result(report)
""", tmp_path)
    assert [call["method"] for call in report["empty"]] == ["label"]
    assert report["empty"][0]["args"]["text"] == "Nothing generated yet"
    assert report["real icons"] == [0, 0, 0] and report["missing icon"] == 0
    assert not [call for call in report["without icons"] if call["method"] == "template_icon"]

    calls = report["items"]
    boxes = [call for call in calls if call["method"] == "box"]
    assert len(boxes) == 3 and all(box["path"] == "layout" for box in boxes)
    assert not [call for call in calls if call["method"] == "label" and call["path"] == "layout"]
    # Each item is called after its prompt (its title: results.generation_title).
    expected = [("Prompt 2", 102, "wide", 1002), ("Prompt 1", 101, "tile", None), ("Prompt 0", 100, "world", 1000)]
    for index, (box, (prompt, seed, mode, icon)) in enumerate(zip(boxes, expected)):  # newest first
        inside = _under(calls, box)
        labels = [call["args"]["text"] for call in inside if call["method"] == "label"]
        assert labels == [prompt, f"Seed {seed}, {mode}, Balanced"]
        icons = [call["args"] for call in inside if call["method"] == "template_icon"]
        assert icons == ([{"icon_value": icon, "scale": 3.0}] if icon else [])
        operators = [(call["args"]["operator"], call["args"]["text"], call["properties"])
                     for call in inside if call["method"] == "operator"]
        assert operators == [("syncsphere.history_apply", "Apply", {"index": index}),
                             ("syncsphere.history_reuse", "Reuse", {"index": index}),
                             ("syncsphere.history_upscale", "x2", {"index": index, "scale": 2}),
                             ("syncsphere.history_upscale", "x4", {"index": index, "scale": 4})]

    # Ten items: the eight newest are listed.
    ten = report["ten"]
    boxes = [call for call in ten if call["method"] == "box"]
    assert len(boxes) == 8
    first_labels = [next(call["args"]["text"] for call in _under(ten, box) if call["method"] == "label")
                    for box in boxes]
    assert first_labels == [f"Prompt {number}" for number in range(9, 1, -1)]
    newest = next(call for call in report["summary"] if call["method"] == "box")
    assert [call["args"]["text"] for call in _under(report["summary"], newest) if call["method"] == "label"] == \
        ["Prompt 10", "Seed 110, wide, Fast, SyncSDE", "Shifted schedule, 2.5 views per step (2-3)"]
