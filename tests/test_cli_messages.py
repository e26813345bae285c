"""What a newcomer reads from the command line: the help's defaults, the note when a world runs ``band``, one
progress bar, one sentence when the hub cannot be reached, and suggestions that name only real flags."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from backend.app.cli import build_parser
from backend.engine.resolve import choose_views, default_view_set_note
from backend.request import DEFAULT_SIZES, DEFAULT_VIEW_SET, LAYOUTS, GenerateRequest, ModelGeometry, sampling_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD2_BASE = ModelGeometry(vae_scale_factor=8, latent_channels=4, sample_size=64)
"""Stable Diffusion 2 base's geometry, the default model's: a 64-latent (512 px) window."""


def run_cli(*args, env=None):
    """Run ``python -m backend`` (its ``__main__``, as a user does) in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, env=full_env, cwd=REPO,
                            timeout=300)
    # Decoded here, not with text=True, which would turn a progress bar's "\r" (redraw in place) into "\n".
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


def subcommand(*names) -> argparse.ArgumentParser:
    """The parser of ``python -m backend NAMES...`` (e.g. ``"models", "download"``)."""
    parser = build_parser()
    for name in names:
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        parser = commands.choices[name]
    return parser


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help text of ``flag`` in ``parser``, its whitespace as one space."""
    return " ".join(parser._option_string_actions[flag].help.split())


# --- the help's defaults are the request's --------------------------------------------------------------


def test_the_size_help_names_every_layouts_default_size():
    generate = subcommand("generate")
    for axis, flag in enumerate(("--width", "--height")):
        expected = ", ".join(f"{DEFAULT_SIZES[layout][axis]} {layout}" for layout in LAYOUTS)
        assert f"(default: {expected};" in help_of(generate, flag)
    assert "2048 equirect" in help_of(generate, "--width")  # the case: the help said 1024


def test_every_flag_default_is_the_requests_and_every_number_the_help_names_is_the_default():
    """argparse's defaults are GenerateRequest's, and a help's "(default N" is that default, so neither drifts.
    --steps and --guidance default to None, filled from the scheduler (``sampling_defaults``): GenerateRequest's
    for every scheduler but the few-step ones."""
    generate = subcommand("generate")
    fields = GenerateRequest.__dataclass_fields__
    from_scheduler = dict(zip(("steps", "guidance"), sampling_defaults("auto")))
    checked = 0
    for action in generate._actions:
        if action.dest not in fields or action.required:
            continue
        default = from_scheduler.get(action.dest, action.default)
        assert action.default is None or action.dest not in from_scheduler, action.dest
        assert default == fields[action.dest].default, action.dest
        stated = re.search(r"\(default:? (-?\d+(?:\.\d+)?)\b", action.help or "")
        if stated and default is not None:
            assert float(stated.group(1)) == float(default), (action.dest, action.help)
            checked += 1
    assert checked >= 8  # steps, guidance, view batch, LoRA scale, sync decay and every, SyncSDE lambda, exposure...


def test_the_views_help_says_when_the_default_is_band_and_the_examples_hold():
    text = help_of(subcommand("generate"), "--views")
    assert f"Default: {DEFAULT_VIEW_SET} where a row of windows fits within ±60°" in text
    assert "2048x1024 world with SD 2 base), else band (a 1024x512 world)" in text and "stderr" in text
    for (width, height), expected in (((2048, 1024), DEFAULT_VIEW_SET), ((1024, 512), "band")):
        request = GenerateRequest(prompt="x", width=width, height=height, out="/unused").validated()
        assert choose_views(request.sized_for_model(SD2_BASE), SD2_BASE.vae_scale_factor)[0] == expected


# --- the note when a world runs band ------------------------------------------------------------------------


def chosen_views(width, height, views=None):
    """(the request as asked, its parameters with the view set the engine chooses) for SD 2 base."""
    asked = GenerateRequest(prompt="x", width=width, height=height, views=views, out="/unused").validated()
    sized = asked.sized_for_model(SD2_BASE)
    view_set = choose_views(sized, SD2_BASE.vae_scale_factor)[0]
    return asked, GenerateRequest(**{**sized.to_dict(), "views": view_set})


def test_the_note_names_the_smallest_size_where_band_and_poles_fits():
    note = default_view_set_note(*chosen_views(1024, 512), SD2_BASE.vae_scale_factor)
    size = re.search(r"at least (\d+)x(\d+) for a 512 px window", note)
    assert note.startswith("This 1024x512 world runs --views band, not the default band+poles") and size
    width, height = int(size.group(1)), int(size.group(2))
    assert chosen_views(width, height)[1].views == DEFAULT_VIEW_SET  # that size fits
    assert chosen_views(width - 16, height - 8)[1].views == "band"  # the next smaller one does not
    assert "\n" not in note


@pytest.mark.parametrize("width, height, views", [(2048, 1024, None), (1024, 512, "band"), (1024, 512, "ring")])
def test_no_note_when_the_job_runs_the_default_or_what_was_asked(width, height, views):
    assert default_view_set_note(*chosen_views(width, height, views), SD2_BASE.vae_scale_factor) is None


def test_a_small_world_says_on_stderr_that_it_runs_band_and_draws_one_progress_bar(tiny_model, tmp_path):
    """The tiny model's window is 256 px: a 512x256 world runs band. The denoising bar is drawn once, complete
    (it was drawn at 0% and again at the end, after the later stages' lines)."""
    result = run_cli("generate", "--prompt", "a forest", "--model", tiny_model, "--width", "512", "--height", "256",
                     "--steps", "3", "--device", "cpu", "--no-hdr", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "512x256 world runs --views band" in notes[0], result.stderr
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["params"]["views"] == "band"
    bars = [line for line in result.stderr.split("\n") if "denoising" in line]
    assert len(bars) == 1, result.stderr
    assert bars[0].rstrip().split("\r")[-1].startswith("denoising: 100%") and "3/3" in bars[0]
    stages = result.stderr.split("\n")
    assert stages.index(bars[0]) < stages.index("decoding…") < stages.index("writing…")


def test_a_single_file_checkpoint_says_it_too_once_it_has_loaded(tiny_model, tmp_path, capsys):
    """A single-file checkpoint's window is known only once it loads: the note comes after the job."""
    from backend.app.cli import main
    from ldm_checkpoint import write_ldm_single_file

    checkpoint = write_ldm_single_file(tiny_model, str(tmp_path / "tiny.safetensors"))
    code = main(["generate", "--prompt", "a forest", "--model", checkpoint, "--model-config", tiny_model, "--width",
                 "512", "--height", "256", "--steps", "2", "--device", "cpu", "--no-hdr", "--out", str(tmp_path / "out")])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert code == 0 and len(notes) == 1 and "512x256 world runs --views band" in notes[0]


# --- the hub's messages -----------------------------------------------------------------------------------------


def test_an_unreachable_hub_is_one_sentence_without_the_hubs_retry_lines(tmp_path):
    """The README's first command on a machine that cannot reach the hub: huggingface_hub retries five times
    (about 25 s) and logged each try; now only our sentence is printed."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli("generate", "--prompt", "a valley", "--out", str(tmp_path / "out"),
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "hub cannot be reached" in result.stderr


@pytest.mark.parametrize("offline", ["1", "0"])
def test_an_offline_download_suggests_only_flags_that_exist(tmp_path, offline):
    """``models download`` has no --model: its sentence may name generate's only together with generate."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": closed}
    result = run_cli("models", "download", "stabilityai/stable-diffusion-2-base", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    sentence = result.stderr
    flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", sentence)
    assert flags, sentence  # it does suggest something
    download, generate = subcommand("models", "download"), subcommand("generate")
    for flag in flags:
        real = flag in download._option_string_actions or (
            re.search(r"\bgenerate\b", sentence) and flag in generate._option_string_actions)
        assert real, f"{flag} is not a flag of models download (nor named as generate's) in: {sentence}"
