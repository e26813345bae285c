"""Out-of-memory recovery (issue 9, item 5): retry with half the view batch, then in low-memory mode, then
an ``out_of_memory`` error; the worker survives. The UNet's out-of-memory errors come from the tests: a
forward pre-hook on the cached UNet in this process, a patched ``UNet2DConditionModel.forward`` in the
worker's."""

import json
import os

import pytest
import torch

from backend.engine import generation
from backend.engine.memory import is_out_of_memory
from backend.errors import OutOfMemory
from backend.engine.models import ModelCache
from backend.app.job import check_request, run_job
from backend.request import GenerateRequest
from test_server import TIMEOUT, Worker, params


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def wide_request(tiny_model, out, **overrides) -> GenerateRequest:
    # 256x128 wide with window 16 and stride 8: a 32x16 latent, 4 views, so a view batch of 4 can be halved.
    return GenerateRequest(**{"prompt": "a harbour", "layout": "wide", "width": 256, "height": 128, "window": 16,
                              "stride": 8, "steps": 2, "seed": 7, "device": "cpu", "view_batch": 4,
                              "model": tiny_model, "out": str(out), **overrides})


@pytest.fixture
def simulate_oom(models, tiny_model):
    """simulate_oom(mode) makes the cached model's UNet run out of memory as a device would: "first": only on
    its first call, "always": on every call. Returns the list the calls are counted in; ``stop()`` (and the
    end of the test) removes the hook."""
    handles = []

    def start(mode: str) -> list:
        calls = []

        def raise_out_of_memory(module, args):
            calls.append(len(args))
            if mode == "always" or len(calls) == 1:
                raise torch.OutOfMemoryError(f"simulated out of memory ({mode})")

        unet = models.get(check_request(wide_request(tiny_model, "/unused"))).pipeline.unet
        handles.append(unet.register_forward_pre_hook(raise_out_of_memory))
        return calls

    start.stop = lambda: [handles.pop().remove() for _ in list(handles)]
    yield start
    start.stop()


def test_first_unet_call_out_of_memory_retries_with_half_the_view_batch(tiny_model, tmp_path, simulate_oom, models):
    simulate_oom("first")
    steps = []
    outputs = run_job(check_request(wide_request(tiny_model, tmp_path / "oom")),
                      lambda stage, step, total, preview: steps.append((stage, step)), models)
    metadata = json.loads(open(outputs["metadata"]).read())
    memory = metadata["memory"]
    assert {key: memory[key] for key in ("mode", "attempt", "view_batch", "view_batch_used", "retries")} == {
        "mode": "full", "attempt": "half view batch", "view_batch": 2, "view_batch_used": 2,
        "retries": [{"view_batch": 4, "mad_steps": 0, "reason": "out of memory", "next": "half view batch"}],
    }
    assert metadata["params"]["view_batch"] == 4  # what was asked for stays recorded
    assert steps.count(("denoising", 1)) == 1  # the first UNet call failed before step 1 finished

    # The retry starts from the same seed's noise: the same image as asking for view batch 2 outright.
    simulate_oom.stop()
    plain = run_job(check_request(wide_request(tiny_model, tmp_path / "plain", view_batch=2)), models=models)
    assert open(outputs["png"], "rb").read() == open(plain["png"], "rb").read()
    memory = json.loads(open(plain["metadata"]).read())["memory"]
    assert (memory["mode"], memory["attempt"], memory["retries"], memory["view_batch_used"]) == ("full", "full", [], 2)


def test_persistent_out_of_memory_fails_with_advice_and_writes_nothing(tiny_model, tmp_path, simulate_oom, models):
    calls = simulate_oom("always")
    with pytest.raises(OutOfMemory) as raised:
        run_job(check_request(wide_request(tiny_model, tmp_path / "out", mad_steps=1)), models=models)
    message = str(raised.value)
    assert "--view-batch 1" in message and "canvas size" in message
    assert message.endswith(".") and message.count(". ") == 0  # one sentence
    assert len(calls) == 3  # full, half view batch, low: one failed UNet call each
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")

    # The failed attempts leave the cached model as it was: it works for the next job.
    simulate_oom.stop()
    outputs = run_job(check_request(wide_request(tiny_model, tmp_path / "next")), models=models)
    assert os.path.exists(outputs["png"])


def test_other_errors_are_not_taken_for_out_of_memory(tiny_model, tmp_path, monkeypatch, models):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(generation, "decode_canvas", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_job(check_request(wide_request(tiny_model, tmp_path / "out")), models=models)
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"), torch.device("mps"))
    assert not is_out_of_memory(RuntimeError("MPS backend out of memory"), torch.device("cpu"))


# The stdio worker, started after wrapping the UNet's forward so that it runs out of memory: MODE "first" on
# the first call in the process only, "always" on every call.
OUT_OF_MEMORY_WORKER = """
import runpy, sys, torch
from diffusers import UNet2DConditionModel

calls, forward = [], UNet2DConditionModel.forward

def out_of_memory(self, *args, **kwargs):
    calls.append(1)
    if MODE == "always" or len(calls) == 1:
        raise torch.OutOfMemoryError("simulated out of memory (" + MODE + ")")
    return forward(self, *args, **kwargs)

UNet2DConditionModel.forward = out_of_memory
sys.argv = ["backend", "serve", "--stdio"]
runpy.run_module("backend", run_name="__main__")
"""


@pytest.fixture
def start_worker():
    started = []

    def start(mode: str):
        started.append(Worker(["-c", f"MODE = {mode!r}" + OUT_OF_MEMORY_WORKER]))
        return started[-1]

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()


def wide_params(tiny_model, **overrides):
    return params(tiny_model, layout="wide", width=256, height=128, view_batch=4, **overrides)


def test_worker_reports_out_of_memory_and_keeps_running(tiny_model, tmp_path, start_worker):
    worker = start_worker("always")
    worker.send({"op": "generate", "job": "big", "params": wide_params(tiny_model), "out_dir": str(tmp_path / "big")})
    event = worker.until(lambda event: event["event"] in ("done", "error"))[-1]
    assert event["event"] == "error" and event["kind"] == "out_of_memory" and event["job"] == "big"
    assert "canvas size" in event["message"] and event["message"].endswith(".")
    assert not (tmp_path / "big" / "panorama.png").exists()
    worker.send({"op": "hello"})
    assert worker.next_event()["event"] == "ready"
    worker.send({"op": "shutdown"})
    assert worker.process.wait(timeout=TIMEOUT) == 0


def test_worker_recovers_from_a_first_out_of_memory_and_runs_the_next_job(tiny_model, tmp_path, start_worker):
    worker = start_worker("first")
    for name in ("a", "b"):
        worker.send({"op": "generate", "job": name, "params": wide_params(tiny_model), "out_dir": str(tmp_path / name)})
    events = worker.until(lambda event: event["event"] in ("done", "error") and event["job"] == "b")
    finished = [(event["job"], event["event"]) for event in events if event["event"] in ("done", "error")]
    assert finished == [("a", "done"), ("b", "done")]
    memory = [json.loads((tmp_path / name / "metadata.json").read_text())["memory"] for name in "ab"]
    assert [entry["view_batch_used"] for entry in memory] == [2, 4]
    assert [len(entry["retries"]) for entry in memory] == [1, 0]
    worker.send({"op": "shutdown"})
    assert worker.process.wait(timeout=TIMEOUT) == 0
