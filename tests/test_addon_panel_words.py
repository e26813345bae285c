"""The backend's sentences in the panel's words (blender_addon/core/panel_words.py), without Blender.

The sentences are the backend's own, produced by its validation (backend/request.py) and its engine, never
copied here: a reworded backend message still has to come out naming the panel's controls. And every flag the
backend's source can name must be in the mapping or deliberately CLI-only, so a new message with a new flag
fails here before an artist reads it in Blender. (tests/test_blender_panels.py checks the other end: each label
is a control drawn where the label says.)
"""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from backend import request as backend_request
from backend.errors import BadRequest
from backend.request import GenerateRequest, ModelGeometry
from syncsphere.blender_addon.core import panel_words
from syncsphere.blender_addon.core.panel_words import CLI_ONLY_FLAGS, CONTROLS, in_panel_words

REPO = Path(__file__).resolve().parent.parent


def _docstrings(tree):
    """The string nodes of ``tree`` that are docstrings (documentation, never shown to a user)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def flags_in_source(root):
    """Every ``--flag`` in the string literals (f-strings' text included, docstrings and comments left out) of
    the Python files under ``root``: what the backend's messages and its argument parsers can name."""
    flags = set()
    for path in Path(root).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                flags.update(panel_words.flags_in(node.value))
    return flags


def backend_flags():
    """The flags the backend can name: those in its source, and one per GenerateRequest field (the type check
    builds "--<field>" from the field's name for every field)."""
    fields = {"--" + field.name.replace("_", "-") for field in dataclasses.fields(GenerateRequest)}
    return flags_in_source(REPO / "backend") | fields


def refusal(**params):
    """The backend's sentence refusing ``params`` (a generate request, validated as the worker does)."""
    with pytest.raises(BadRequest) as refused:
        GenerateRequest(**{"prompt": "a harbour", "out": "/tmp/unused", **params}).validated()
    return str(refused.value)


# --- the mapping covers the backend --------------------------------------------------------------------


def test_every_flag_the_backend_can_name_has_a_control_or_is_cli_only():
    flags = backend_flags()
    unmapped = sorted(flags - set(CONTROLS) - CLI_ONLY_FLAGS)
    assert not unmapped, f"add these to panel_words.CONTROLS or CLI_ONLY_FLAGS: {unmapped}"
    assert not set(CONTROLS) & CLI_ONLY_FLAGS
    # And nothing stale: every entry is a flag the backend still has.
    assert not (set(CONTROLS) | CLI_ONLY_FLAGS) - flags


def test_the_flag_collection_finds_a_new_message_and_skips_docstrings(tmp_path):
    """The check above bites: a message with a new flag is found, in a plain string and in an f-string; a
    docstring's flag is not."""
    (tmp_path / "new.py").write_text(
        '"""Module docs: --not-a-message."""\n'
        'def check(value):\n'
        '    """Docs: --also-docs."""\n'
        '    if value:\n'
        '        raise ValueError(f"--brand-new {value} is too large; lower --window.")\n'
        '    raise ValueError("use --views ring")\n', encoding="utf-8")
    flags = flags_in_source(tmp_path)
    assert flags == {"--brand-new", "--window", "--views"}
    assert sorted(flags - set(CONTROLS) - CLI_ONLY_FLAGS) == ["--brand-new"]


def test_the_values_named_are_the_backends_own():
    """Each control's values are values its flag takes (so a message naming one is rewritten)."""
    accepted = {"--layout": backend_request.LAYOUTS, "--views": backend_request.VIEW_SETS,
                "--sync": backend_request.SYNC_METHODS, "--memory": backend_request.MEMORY_MODES,
                "--schedule": backend_request.SCHEDULES, "--device": ("auto", "cpu", "cuda", "mps")}
    for flag, values in accepted.items():
        assert set(CONTROLS[flag].values) <= set(values), flag


# --- real messages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,expected", [
    ({"layout": "tile", "width": 512, "height": 512, "prompt_up": "sky"},
     "Advanced › Sky Prompt applies only to Mode: 360° World, where views can look up and down."),
    ({"no_hdr": True, "exposure": 1.0},
     "Lighting › Exposure sets the HDR lighting that Lighting › HDR turns off; leave one of them out."),
    ({"sync_steps": 3}, "Advanced › Guided Steps only applies to SyncDiffusion; add Advanced › Synchronisation: "
                        "SyncDiffusion or leave it out."),
    ({"schedule": "shifted", "views": "ring"},
     "The ring view set has no crop windows for the shifted schedule to move; use Advanced › View Set: Band or "
     "Band + Poles, or Quality: Best."),
    ({"schedule": "shifted", "sync": "syncsde"},
     "SyncSDE ties views where they overlap, and the shifted schedule's windows do not overlap; use Quality: Best "
     "with Advanced › Synchronisation: SyncSDE."),
    ({"steps": 0}, "Advanced › Steps must be at least 1, not 0."),
    ({"exposure": 25.0}, "Lighting › Exposure must be a number of EV between -20 and 20, not 25.0."),
    ({"sun_direction": "10,100"}, "Lighting › Sun Direction's pitch 100° is off the sphere; it must lie between -90 and 90."),
    ({"prompt": "  "}, "The prompt is empty; describe the scene with Prompt."),
])
def test_validation_messages_name_the_panels_controls(params, expected):
    assert in_panel_words(refusal(**params)) == expected


def test_model_sized_messages_name_the_advanced_window_and_stride():
    geometry = ModelGeometry(vae_scale_factor=8, latent_channels=4, sample_size=16)
    request = GenerateRequest(prompt="x", layout="tile", width=512, height=512, window=16, stride=40, out="/tmp/u")
    with pytest.raises(BadRequest) as refused:
        request.validated().sized_for_model(geometry)
    assert in_panel_words(str(refused.value)) == \
        "Advanced › Stride 40 is larger than the window 16; views would leave gaps."
    small = GenerateRequest(prompt="x", layout="tile", width=64, height=64, out="/tmp/u")
    with pytest.raises(BadRequest) as refused:
        small.validated().sized_for_model(geometry)
    assert in_panel_words(str(refused.value)).endswith("or pass a smaller Advanced › Window.")


def test_the_sky_prompt_without_a_view_that_looks_up_names_the_view_sets_that_have_one():
    """The engine's refusal (backend/engine/resolve.py) of a Sky Prompt on the band view set."""
    pytest.importorskip("torch")
    from backend.engine.resolve import choose_views, direction_prompt_rows

    request = GenerateRequest(prompt="x", width=1024, height=512, views="band", prompt_up="sky", out="/tmp/u")
    request = request.validated().sized_for_model(ModelGeometry(8, 4, 64))
    _, views, _ = choose_views(request, 8)
    with pytest.raises(BadRequest) as refused:
        direction_prompt_rows(request, views)
    sentence = in_panel_words(str(refused.value))
    assert sentence.startswith("Advanced › Sky Prompt has no view to act on")
    assert sentence.endswith("use Advanced › View Set: Band + Poles, Ring or Cube.")


def test_the_out_of_memory_advice_names_size_and_window():
    pytest.importorskip("torch")
    import torch

    from backend.engine.memory import out_of_memory_message

    request = GenerateRequest(prompt="x", sync="syncdiffusion", out="/tmp/u").validated()
    sentence = in_panel_words(out_of_memory_message(request, torch.device("cuda"), torch.float32))
    assert "lower the canvas size (Size) or Advanced › Window" in sentence
    assert "Advanced › Fast Guidance for SyncDiffusion's gradient pass" in sentence
    # Only CLI-only flags are left (the panel cannot change them).
    assert set(panel_words.flags_in(sentence)) <= CLI_ONLY_FLAGS


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(GenerateRequest)
                                   if field.name not in ("prompt", "out")])
def test_no_type_refusal_leaves_a_flag_the_panel_has_a_control_for(field):
    """Every field refused for its type ("--<field> must be ...") comes out with no flag of CONTROLS left."""
    sentence = in_panel_words(refusal(**{field: {"not": "a value"}}))
    flags = panel_words.flags_in(sentence)
    assert not set(flags) & set(CONTROLS), sentence
    flag = "--" + field.replace("_", "-")
    if flag in CONTROLS:
        assert sentence.startswith(CONTROLS[flag].label), sentence


def test_sentences_without_flags_and_none_are_left_alone():
    assert in_panel_words("The model could not be loaded.") == "The model could not be loaded."
    assert in_panel_words(None) is None and in_panel_words("") == ""
    # A word that merely starts like a value is not a value: "--views bandit" keeps "bandit".
    assert in_panel_words("use --views bandit") == "use Advanced › View Set bandit"
    assert in_panel_words("pass --model PATH.") == "pass Backend › Model."
    assert re.search("--", in_panel_words("lower --width and --height or --window")) is None
