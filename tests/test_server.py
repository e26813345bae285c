"""The stdio worker: protocol events, malformed lines, a queue, cancel mid-job, errors it survives."""

import json
import os
import queue
import subprocess
import sys
import threading

import pytest

from backend.protocol import PROTOCOL_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


class Worker:
    """A real ``python -m backend serve --stdio`` subprocess with a line reader on a thread."""

    def __init__(self, command: list[str] | None = None):
        """command: the Python arguments that start the worker (default ``-m backend serve --stdio``)."""
        self.process = subprocess.Popen(
            [sys.executable, *(command or ["-m", "backend", "serve", "--stdio"])], cwd=REPO, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"},
        )
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def send(self, message) -> None:
        self.process.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.process.stdin.flush()

    def next_event(self) -> dict:
        return json.loads(self.lines.get(timeout=TIMEOUT))  # every stdout line must be JSON

    def until(self, predicate) -> list[dict]:
        """Events up to and including the first that satisfies ``predicate``."""
        events = []
        while not events or not predicate(events[-1]):
            events.append(self.next_event())
        return events


@pytest.fixture
def worker():
    started = Worker()
    yield started
    if started.process.poll() is None:
        started.process.kill()
    started.process.wait()


def params(tiny_model, **overrides):
    return {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "steps": 2, "window": 16,
            "stride": 8, "seed": 1, "device": "cpu", "model": tiny_model, **overrides}


def test_hello_generate_queue_and_shutdown(worker, tiny_model, tmp_path):
    worker.send({"op": "hello"})
    ready = worker.next_event()
    assert ready["event"] == "ready" and ready["protocol"] == PROTOCOL_VERSION == 3 and ready["device"] == "cpu"

    worker.send("this is not json")
    error = worker.next_event()
    assert error == {"event": "error", "job": None, "kind": "bad_request", "message": "The line is not valid JSON."}

    # Two jobs sent at once run one after the other; the second reuses the loaded model.
    for job in ("a", "b"):
        worker.send({"op": "generate", "job": job, "params": params(tiny_model), "out_dir": str(tmp_path / job)})
    events = worker.until(lambda event: event["event"] == "done" and event["job"] == "b")
    done = [event for event in events if event["event"] == "done"]
    assert [event["job"] for event in done] == ["a", "b"]
    progress = [event for event in events if event["event"] == "progress" and event["job"] == "a"]
    assert [event["stage"] for event in progress] == ["loading", "denoising", "denoising", "decoding", "writing"]
    # Step 2's event says how long step 2 took; step 1 has nothing before it to time from, the other stages no steps.
    timed = [event for event in progress if "seconds_per_step" in event]
    assert [(event["stage"], event["step"]) for event in timed] == [("denoising", 2)]
    assert isinstance(timed[0]["seconds_per_step"], float) and 0 <= timed[0]["seconds_per_step"] < TIMEOUT
    assert (tmp_path / "a" / "panorama.png").read_bytes() == (tmp_path / "b" / "panorama.png").read_bytes()

    worker.send({"op": "shutdown"})
    assert worker.process.wait(timeout=TIMEOUT) == 0


def test_cancel_mid_job_leaves_nothing_and_the_next_job_works(worker, tiny_model, tmp_path):
    worker.send({"op": "generate", "job": "long", "params": params(tiny_model, steps=500), "out_dir": str(tmp_path / "long")})
    events = worker.until(lambda event: event.get("stage") == "denoising")
    worker.send({"op": "cancel", "job": "long"})
    events += worker.until(lambda event: event["event"] in ("done", "error"))
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled"
    assert max(event["step"] for event in events if event.get("stage") == "denoising") < 500
    assert not (tmp_path / "long" / "panorama.png").exists()

    worker.send({"op": "generate", "job": "next", "params": params(tiny_model), "out_dir": str(tmp_path / "next")})
    assert worker.until(lambda event: event["event"] in ("done", "error"))[-1]["event"] == "done"


def test_bad_requests_get_error_events_and_the_worker_keeps_running(worker, tiny_model, tmp_path):
    cases = [
        ({"op": "generate", "job": "x", "params": params(tiny_model, steps=0), "out_dir": str(tmp_path / "x")}, "bad_request"),
        ({"op": "generate", "job": "y", "params": params(tiny_model, colour="red"), "out_dir": str(tmp_path / "y")}, "bad_request"),
        ({"op": "generate", "job": "z", "params": params("no-such-org/no-such-model"), "out_dir": str(tmp_path / "z")}, "model_not_found"),
        ({"op": "generate", "job": "w", "params": params(tiny_model), "out_dir": "relative/path"}, "bad_request"),
        ({"op": "fly"}, "bad_request"),
    ]
    for request, kind in cases:
        worker.send(request)
        event = worker.until(lambda event: event["event"] == "error")[-1]
        assert event["kind"] == kind and event["message"].endswith(".")
    assert not any((tmp_path / name).exists() for name in "xyz")
    worker.send({"op": "hello"})
    assert worker.next_event()["event"] == "ready"


def test_the_step_timer_times_each_denoising_step_from_the_one_before():
    """protocol.StepTimer, which the worker and ``generate --json-progress`` use for seconds_per_step: the
    wall time between one step's report and the next; nothing for the first step, other stages, or steps that
    start again from 1 (an out-of-memory retry)."""
    from backend import protocol

    now = [100.0]
    timer = protocol.StepTimer(clock=lambda: now[0])
    reports = [("loading", 0, 0.0), ("denoising", 1, 7.0), ("denoising", 2, 0.8), ("denoising", 3, 1.25),
               ("denoising", 1, 0.5), ("denoising", 2, 0.5), ("decoding", 0, 2.0), ("writing", 0, 1.0)]
    seen = []
    for stage, step, elapsed in reports:
        now[0] += elapsed
        seen.append(timer.seconds_per_step(stage, step))
    assert seen == [None, None, 0.8, 1.25, None, 0.5, None, None]
    # The event carries the field only when there is a value.
    assert protocol.progress_event("j", "denoising", 2, 50, seconds_per_step=0.8)["seconds_per_step"] == 0.8
    assert "seconds_per_step" not in protocol.progress_event("j", "denoising", 1, 50)
