"""Every protocol params value of a wrong type or out of range is a BadRequest with one short sentence, never an
internal error: non-finite numbers in whole-number fields, text fields given lists or numbers, switches given
strings, schedulers of another model family, text that is not Unicode, and echoes of huge values cut short."""

import os
import subprocess
import sys

import pytest

from backend.app.job import check_request
from backend.errors import BadRequest
from backend.request import MAX_STEPS, MAX_TEXT_CHARACTERS, GenerateRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NON_FINITE = (float("nan"), float("inf"), float("-inf"))
WHOLE_NUMBER_FIELDS = ("width", "height", "steps", "seed", "window", "stride", "view_batch", "mad_steps")
SYNCDIFFUSION_WHOLE_NUMBER_FIELDS = ("sync_loss_size", "sync_steps", "sync_every")
EQUIRECT = {"layout": "equirect", "width": 256, "height": 128}


def tile_params(tiny_model, out, **overrides) -> dict:
    return {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "steps": 2, "window": 16,
            "stride": 8, "seed": 1, "device": "cpu", "model": tiny_model, "out": str(out), **overrides}


def refusal(params: dict) -> str:
    """The one sentence ``check_request`` refuses ``params`` with; fails the test on anything but a BadRequest."""
    with pytest.raises(BadRequest) as refused:
        check_request(GenerateRequest.from_params(params))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and message.endswith(".") and len(message) < 400
    return message


@pytest.mark.parametrize("value", NON_FINITE, ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("field", WHOLE_NUMBER_FIELDS + SYNCDIFFUSION_WHOLE_NUMBER_FIELDS)
def test_non_finite_numbers_in_whole_number_fields_are_bad_requests(tiny_model, tmp_path, field, value):
    sync = {"sync": "syncdiffusion"} if field in SYNCDIFFUSION_WHOLE_NUMBER_FIELDS else {}
    message = refusal(tile_params(tiny_model, tmp_path / "out", **sync, **{field: value}))
    assert "whole number" in message and f"--{field.replace('_', '-')}" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,expected", [
    ({"scheduler": ["ddim"]}, "--scheduler must be text"),
    ({"scheduler": {"name": "ddim"}}, "--scheduler must be text"),
    ({"model": 3}, "--model must be text"),
    ({"model": ["/a/model"]}, "--model must be text"),
    ({"negative_prompt": 5}, "--negative-prompt must be text"),
    ({"model_config": 5}, "--model-config must be text"),
    ({"lora_scale": "strong"}, "--lora-scale must be a finite number"),
    ({"guidance": float("nan")}, "--guidance must be a finite number"),
    ({"sync": "syncdiffusion", "sync_anchor": [1]}, "--sync-anchor must be text or a whole number"),
    ({**EQUIRECT, "sun_direction": [1e400, 0]}, "must be finite"),
    ({**EQUIRECT, "sun_direction": 30}, "--sun-direction must be text or a list"),
    ({"steps": MAX_STEPS + 1}, f"more than the {MAX_STEPS} noise levels"),
    ({"window": 10**30}, "--window must be a positive number"),
])
def test_wrong_types_are_bad_requests(tiny_model, tmp_path, overrides, expected):
    assert expected in refusal(tile_params(tiny_model, tmp_path / "out", **overrides))


@pytest.mark.parametrize("field", ["overwrite", "allow_pickle", "no_hdr", "half", "sync_reuse_eps"])
@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_switches_take_json_booleans_only(tiny_model, tmp_path, field, value):
    sync = {"sync": "syncdiffusion"} if field.startswith("sync_") else {}
    message = refusal(tile_params(tiny_model, tmp_path / "out", **sync, **{field: value}))
    assert f"--{field.replace('_', '-')} is a switch (true or false)" in message


def test_a_string_switch_neither_replaces_outputs_nor_allows_pickle(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "panorama.png").write_bytes(b"the user's image")
    refusal(tile_params(tiny_model, out, overwrite="no"))
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"pickled")
    refusal(tile_params(str(checkpoint), tmp_path / "other", allow_pickle="false"))
    assert (out / "panorama.png").read_bytes() == b"the user's image"


@pytest.mark.parametrize("scheduler,expected", [
    ("FlowMatchEulerDiscreteScheduler", "is not a sampler for Stable Diffusion's noise schedule"),
    ("DPMSolverSDEScheduler", "needs torchsde"),
    ("NoSuchScheduler", "has no scheduler named"),
])
def test_schedulers_the_engine_cannot_use_are_refused_before_loading(tiny_model, tmp_path, scheduler, expected):
    assert expected in refusal(tile_params(tiny_model, tmp_path / "out", scheduler=scheduler))


def test_usable_schedulers_pass(tiny_model, tmp_path):
    for scheduler in ("auto", "ddim", "lcm", "euler-a", "HeunDiscreteScheduler", "DEISMultistepScheduler"):
        check_request(GenerateRequest.from_params(tile_params(tiny_model, tmp_path / "out", scheduler=scheduler)))


def test_text_must_be_unicode_and_bounded(tiny_model, tmp_path):
    assert "not valid text" in refusal(tile_params(tiny_model, tmp_path / "out", prompt="caf\udce9"))
    assert "not valid text" in refusal(tile_params(tiny_model, tmp_path / "out", negative_prompt="\ud800x"))
    too_long = refusal(tile_params(tiny_model, tmp_path / "out", prompt="x" * (MAX_TEXT_CHARACTERS + 1)))
    assert f"at most {MAX_TEXT_CHARACTERS}" in too_long


def test_huge_values_are_echoed_cut_short(tiny_model, tmp_path):
    huge = "y" * 10_000_000
    for field in ("scheduler", "layout", "device", "dtype", "memory", "fusion", "sync", "mad_blocks"):
        message = refusal(tile_params(tiny_model, tmp_path / "out", **{field: huge}))
        assert len(message) < 400, field
    assert len(refusal(tile_params(tiny_model, tmp_path / "out", scheduler=[0] * 1_000_000))) < 400


def test_cli_refuses_a_foreign_scheduler_and_a_non_utf8_prompt_in_one_sentence(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable.encode(), b"-m", b"backend", b"generate", b"--model", tiny_model.encode(),
            b"--layout", b"tile", b"--width", b"128", b"--height", b"128", b"--device", b"cpu"]
    for extra, expected in (
        ([b"--prompt", b"x", b"--scheduler", b"FlowMatchEulerDiscreteScheduler"], "is not a sampler"),
        ([b"--prompt", b"caf\xff"], "not valid text"),  # argv as the shell passes it: raw bytes
    ):
        out = tmp_path / "out"
        done = subprocess.run([*base, *extra, b"--out", str(out).encode()], capture_output=True, env=env, cwd=REPO)
        error = done.stderr.decode("utf-8", "replace").strip()
        assert done.returncode == 2, error
        assert error.startswith("error: ") and len(error.splitlines()) == 1 and expected in error
        assert not out.exists()


@pytest.mark.parametrize("scheduler,expected", [
    ("ddim", "would pass the model's 1000 noise levels"),  # steps_offset 1: level 1000 of 0..999
    ("lcm", "does not suit the LCMScheduler sampler"),  # LCM takes at most its 50 original steps
])
def test_more_steps_than_the_sampler_takes_is_one_sentence_before_the_first_step(tiny_model, tmp_path, capsys,
                                                                                 scheduler, expected):
    from backend.app.cli import main

    code = main(["generate", "--prompt", "x", "--model", tiny_model, "--layout", "tile", "--width", "128",
                 "--height", "128", "--window", "16", "--device", "cpu", "--steps", str(MAX_STEPS),
                 "--scheduler", scheduler, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: ") and expected in error and error.endswith(".")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,refused", [
    ({}, None),
    ({"views": "band+poles"}, None),
    ({"sync": "syncdiffusion", "mad_steps": 3}, None),
    ({"stride": 8}, "--stride"),
    ({"fusion": "clean"}, "--fusion"),
    ({"sync": "syncsde"}, "SyncSDE"),
    ({"views": "ring"}, "ring view set"),
    ({"views": "cube"}, "cube view set"),
])
def test_the_options_that_need_overlapping_windows_are_those_shifted_refuses(tmp_path, option, refused):
    """GenerateRequest.needs_overlapping_windows (which the add-on asks before it sends the shifted schedule)
    names exactly the options _check_schedule refuses with an explicit shifted, and auto then resolves to dense."""
    params = {"prompt": "x", **EQUIRECT, "out": str(tmp_path / "out"), **option}
    asked = GenerateRequest.from_params(params)
    assert asked.needs_overlapping_windows == (refused is not None)
    if refused is None:
        assert GenerateRequest.from_params({**params, "schedule": "shifted"}).validated().resolved_schedule == "shifted"
    else:
        with pytest.raises(BadRequest, match=refused):
            GenerateRequest.from_params({**params, "schedule": "shifted"}).validated()
        assert asked.validated().resolved_schedule == "dense"
