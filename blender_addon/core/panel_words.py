"""The backend's sentences in the panel's words, as plain Python (no bpy), tested without Blender.

The backend speaks the command line: "pass a smaller --window", "use --views band+poles, ring or cube". An
artist in Blender sees controls, not flags. ``CONTROLS`` is the one table from each flag (and its values) the
backend can name to the control that sets it, as a path of panel labels ("Advanced › Window"); ``in_panel_words``
rewrites a sentence with it. Every sentence the add-on shows from the backend goes through it: a generation's
error (``worker_client.GenerationJob``), a refusal before a job (``preflight``), the models list and downloads
(``model_list``) and the cube-map export (``operators/export.py``).

Flags the panel has no control for (``CLI_ONLY_FLAGS``) stay as they are: the add-on never sends them, so a
sentence naming one can only come from the command line or ask for something only the command line does.
``tests/test_addon_panel_words.py`` reads every flag in the backend's source and fails when one is in neither
table, so a new backend message with a new flag cannot reach the panel untranslated.
"""

import dataclasses
import re

# The panel's places, as its sub-panels are labelled (panels/__init__.py, SUB_PANELS); the main panel's own
# controls have no prefix.
ADVANCED = "Advanced › "
LIGHTING = "Lighting › "
BACKEND = "Backend › "
PREFERENCES = "SyncSphere Preferences › "


@dataclasses.dataclass(frozen=True)
class Control:
    """The panel control a flag stands for.

    label: where it is, as the artist reads it ("Advanced › Window"); data and setting: the property it draws
    (``data`` "settings" is ``scene.syncsphere``, "prefs" the add-on preferences), which the Blender panel tests
    find drawn under that label; values: the flag's values as the control's item names ("band+poles" ->
    "Band + Poles"), where a value of None is dropped (it is the control itself, e.g. Fast Guidance is
    ``--sync-decoder taesd``; or a placeholder such as ``--out DIR``).
    """

    label: str
    data: str
    setting: str
    values: dict = dataclasses.field(default_factory=dict)


# Flag -> the control that sets it. Item names are those of the properties' enums (blender_addon/scene/
# properties.py), checked against them by tests/test_blender_panels.py.
CONTROLS = {
    "--prompt": Control("Prompt", "settings", "prompt"),
    "--negative-prompt": Control("Avoid", "settings", "negative_prompt"),
    "--layout": Control("Mode", "settings", "mode",
                        {"equirect": "360° World", "tile": "Tileable Texture", "wide": "Wide Image"}),
    "--width": Control("Size", "settings", "resolution"),
    "--height": Control("Size", "settings", "resolution"),
    # Size's Ultra preset is a generation at half the size, upscaled twice (generation.UPSCALED_PRESETS).
    "--upscale": Control("Size", "settings", "resolution"),
    "--init-image": Control("Image File", "settings", "start_image_path", {"FILE": None}),
    "--strength": Control("Strength", "settings", "strength"),
    "--photo": Control("Photo File", "settings", "photo_path"),
    "--photo-fov": Control("Field of View", "settings", "photo_fov"),
    "--photo-yaw": Control("Yaw", "settings", "photo_yaw"),
    "--photo-pitch": Control("Pitch", "settings", "photo_pitch"),
    "--seed": Control("Seed", "settings", "seed"),
    # Quality picks the schedule (generation.QUALITIES): Fast is the shifted one, Best the dense one.
    "--schedule": Control("Quality", "settings", "quality", {"shifted": "Fast", "dense": "Best"}),
    "--steps": Control(ADVANCED + "Steps", "settings", "steps"),
    "--guidance": Control(ADVANCED + "Guidance", "settings", "guidance"),
    "--views": Control(ADVANCED + "View Set", "settings", "view_set",
                       {"band": "Band", "band+poles": "Band + Poles", "ring": "Ring", "cube": "Cube"}),
    "--prompt-up": Control(ADVANCED + "Sky Prompt", "settings", "prompt_up"),
    "--prompt-down": Control(ADVANCED + "Ground Prompt", "settings", "prompt_down"),
    "--sync": Control(ADVANCED + "Synchronisation", "settings", "sync_method",
                      {"multidiffusion": "MultiDiffusion", "syncdiffusion": "SyncDiffusion", "syncsde": "SyncSDE"}),
    "--sync-weight": Control(ADVANCED + "Coherence Strength", "settings", "sync_weight"),
    "--sync-steps": Control(ADVANCED + "Guided Steps", "settings", "sync_steps"),
    # Fast Guidance sends these three (generation.FAST_SYNC_PARAMS).
    "--sync-decoder": Control(ADVANCED + "Fast Guidance", "settings", "sync_fast", {"taesd": None}),
    "--sync-reuse-eps": Control(ADVANCED + "Fast Guidance", "settings", "sync_fast"),
    "--sync-loss-size": Control(ADVANCED + "Fast Guidance", "settings", "sync_fast"),
    "--syncsde-lambda": Control(ADVANCED + "Pull Strength", "settings", "syncsde_lambda"),
    "--mad-steps": Control(ADVANCED + "Merged Attention", "settings", "mad"),
    "--window": Control(ADVANCED + "Window", "settings", "window"),
    "--stride": Control(ADVANCED + "Stride", "settings", "stride"),
    "--device": Control(ADVANCED + "Device", "settings", "device",
                        {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA", "mps": "Apple Metal"}),
    "--memory": Control(ADVANCED + "Memory", "settings", "memory", {"auto": "Auto", "full": "Full", "low": "Low"}),
    "--quantize": Control(ADVANCED + "Weights", "settings", "quantize", {"none": "Full Precision", "int8": "Int8"}),
    "--no-hdr": Control(LIGHTING + "HDR", "settings", "hdr"),
    "--exposure": Control(LIGHTING + "Exposure", "settings", "exposure"),
    "--sun-ratio": Control(LIGHTING + "Sun Ratio", "settings", "sun_ratio"),
    "--sun-direction": Control(LIGHTING + "Sun Direction", "settings", "use_sun_direction"),
    "--model": Control(BACKEND + "Model", "prefs", "default_model_menu", {"PATH": None}),
    "--out": Control(PREFERENCES + "Output Folder", "prefs", "output_dir", {"DIR": None}),
    "--folder": Control(PREFERENCES + "Model Folder", "prefs", "model_folder"),
    "--fp16": Control(PREFERENCES + "fp16", "prefs", "download_fp16"),
}

# Flags the panel deliberately has no control for: research and file options the add-on never sends
# (generation.generate_params), and the other commands' flags (metrics, cubemap, view, hdr, models, serve).
CLI_ONLY_FLAGS = frozenset({
    "--fusion", "--view-batch", "--compile", "--scheduler", "--dtype", "--half", "--lora", "--lora-scale", "--unet-file", "--model-config",
    "--allow-pickle", "--revision", "--overwrite", "--json-progress", "--json", "--help", "--version", "--stdio",
    "--sync-loss", "--sync-loss-backbone", "--sync-anchor", "--sync-every", "--sync-decay", "--sync-checkpointing",
    "--syncsde-compose", "--syncsde-open-chain", "--mad-blocks", "--sun-strength", "--inv",
    "--fov", "--yaw", "--pitch", "--roll", "--size", "--face-size", "--window-px", "--backbone",
    "--preview-every", "--cpu", "--ray-address", "--workers", "--ray", "--host", "--port", "--token-file",
    "--allow-remote", "--replicas", "--max-jobs",
    "--scale",  # ``upscale``'s: the History's Upscale x2 / x4 send a generate job (core/image_input.py)
})

# What joins a flag's values in a sentence: "--views band+poles, ring or cube".
_VALUE_JOINS = r"(?:, | or | and |, or )"


def _flag_pattern(flag, control):
    """The regular expression of ``flag`` in a sentence, with the list of its known values that follows it."""
    pattern = re.escape(flag) + r"(?![\w-])"
    if control.values:
        # Longest first, so "band+poles" is read whole and not as "band".
        value = "(?:" + "|".join(re.escape(v) for v in sorted(control.values, key=len, reverse=True)) + r")(?![\w+-])"
        pattern += f"(?P<values> {value}(?:{_VALUE_JOINS}{value})*)?"
    return re.compile(pattern)


_PATTERNS = [(flag, control, _flag_pattern(flag, control))
             for flag, control in sorted(CONTROLS.items(), key=lambda item: len(item[0]), reverse=True)]

# A label named twice in a row ("Size and Size" from "--width and --height") is said once.
_REPEATS = [(label, re.compile(re.escape(label) + f"(?:{_VALUE_JOINS}{re.escape(label)})+"))
            for label in sorted({control.label for control in CONTROLS.values()}, key=len, reverse=True)]


def _control_words(control, match):
    """A flag's match (with its values, if any) as the control's label and item names."""
    values = match.groupdict().get("values")
    if not values:
        return control.label
    named = re.sub("|".join(re.escape(v) for v in sorted(control.values, key=len, reverse=True)),
                   lambda value: control.values[value.group()] or "", values).strip(" ,")
    named = re.sub(r"^(?:or|and) |(?:, | or | and )$", "", named)  # a dropped value leaves no dangling join
    return f"{control.label}: {named}" if named else control.label


def in_panel_words(sentence):
    """``sentence`` (one of the backend's) with every flag the panel has a control for replaced by the control's
    label path, and the flag's values by the control's item names: "pass a smaller --window" -> "pass a smaller
    Advanced › Window"; "use --views band+poles, ring or cube" -> "use Advanced › View Set: Band + Poles, Ring
    or Cube". Flags in CLI_ONLY_FLAGS, and anything else, are left as they are. None stays None."""
    if not sentence:
        return sentence
    for _, control, pattern in _PATTERNS:
        sentence = pattern.sub(lambda match, control=control: _control_words(control, match), sentence)
    for label, repeat in _REPEATS:
        sentence = repeat.sub(label, sentence)
    return sentence


def flags_in(text):
    """Every flag (``--name``) named in ``text``, in order of appearance, each once."""
    return list(dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)))
