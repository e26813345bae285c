"""The add-on's worker client against a real backend process: jobs, cancel, a killed, hung or garbling worker."""

import os
import re
import signal
import sys

import pytest

from syncsphere.backend import protocol
from syncsphere.blender_addon.core import backend_command as commands
from syncsphere.blender_addon.core import worker_client as client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def worker(tmp_path):
    env = commands.backend_environment(REPO, allow_network=False)
    started = client.BackendWorker(commands.backend_command(sys.executable), env, REPO, str(tmp_path / "logs" / "backend.log"))
    yield started
    started.stop(grace_s=2)


def params(tiny_model, **overrides):
    return {"prompt": "a harbour", "layout": "equirect", "width": 256, "height": 128, "steps": 2, "window": 16,
            "stride": 8, "seed": 4, "device": "cpu", "model": tiny_model, **overrides}


def test_a_job_runs_to_done_and_reports_progress(worker, tiny_model, tmp_path):
    job = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "out"))
    job.start()
    stages = set()
    while not job.poll(wait_s=0.5):
        stages.add(job.stage)
    assert job.state == "done", job.error
    assert os.path.isfile(job.outputs["exr"]) and {"denoising"} <= stages | {job.stage}
    assert os.path.isfile(worker.log_path)  # the worker's stderr went to the log


def test_backend_errors_become_the_jobs_sentence_in_the_panels_words(worker, tiny_model, tmp_path):
    job = client.GenerationJob(worker, params(tiny_model, steps=0), str(tmp_path / "out"))
    job.start()
    assert job.wait(60) and job.state == "error"
    # The backend says "--steps must be at least 1, not 0."; the artist reads the panel's control.
    assert job.error == "Advanced › Steps must be at least 1, not 0."


def test_cancel_then_the_next_job_succeeds(worker, tiny_model, tmp_path):
    job = client.GenerationJob(worker, params(tiny_model, steps=500), str(tmp_path / "long"))
    job.start()
    while job.stage != "denoising" and not job.finished:
        job.poll(wait_s=0.5)
    job.cancel()
    assert job.wait(60) and job.state == "cancelled"
    assert not os.path.exists(tmp_path / "long" / "panorama.png")
    after = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "after"))
    after.start()
    assert after.wait(120) and after.state == "done"


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_dead_or_hung_worker_fails_the_job_and_is_replaced(worker, tiny_model, tmp_path, failure):
    job = client.GenerationJob(worker, params(tiny_model, steps=500), str(tmp_path / "broken"))
    job.start()
    while job.stage != "denoising" and not job.finished:
        job.poll(wait_s=0.5)
    if failure == "hung":
        # Short only now (loading may legitimately be silent for longer), and only for the stopped worker:
        # a killed one must be told apart by its exit, however long a step takes on a busy machine.
        job.hang_timeout_s = 3
    process = worker.process
    os.kill(process.pid, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
    assert job.wait(60) and job.state == "error"
    assert worker.log_path in job.error
    assert ("stopped unexpectedly" if failure == "killed" else "sent nothing") in job.error
    assert process.poll() is not None  # a hung worker was killed, not left behind
    assert not os.path.exists(tmp_path / "broken" / "panorama.png")

    next_job = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "next"))
    next_job.start()
    assert next_job.wait(120) and next_job.state == "done"


def test_a_malformed_line_fails_the_job_with_one_sentence(tmp_path):
    # A stand-in worker that greets properly, then prints something that is not protocol JSON.
    script = tmp_path / "garbling_worker.py"
    script.write_text(
        "import sys\n"
        "sys.stdin.readline(); print('{\"event\": \"ready\", \"protocol\": 1}', flush=True)\n"
        "sys.stdin.readline(); print('Traceback (most recent call last):', flush=True)\n"
        "sys.stdin.read()\n"
    )
    worker = client.BackendWorker([sys.executable, str(script)], dict(os.environ), str(tmp_path), str(tmp_path / "log.txt"))
    job = client.GenerationJob(worker, {"prompt": "x"}, str(tmp_path / "out"))
    job.start()
    assert job.wait(30) and job.state == "error"
    assert "not protocol JSON" in job.error and "Traceback" in job.error
    assert not worker.is_alive()


def test_the_client_reads_and_writes_lines_with_the_protocol_module():
    """The requests the client sends are ones the backend's parse_request accepts; events the backend writes
    parse back unchanged, and a line that is not an event is one sentence (the client then stops the worker)."""
    for request in (protocol.hello_request(), protocol.generate_request("job-1", {"prompt": "é"}, os.path.abspath("out")),
                    protocol.cancel_request("job-1"), protocol.shutdown_request()):
        assert protocol.parse_request(client._request_line(request).decode("utf-8")) == request
    event = protocol.progress_event("job-1", "denoising", 3, 50)
    assert protocol.parse_event(protocol.encode(event)) == event
    assert protocol.parse_event('{"event": "from a newer backend"}') == {"event": "from a newer backend"}
    for line, sentence in (("Traceback (most recent call last):", "The line is not valid JSON."),
                           ('["event"]', "An event must be a JSON object with an event name."),
                           ('{"op": "hello"}', "An event must be a JSON object with an event name.")):
        with pytest.raises(protocol.ProtocolError, match=re.escape(sentence)):
            protocol.parse_event(line)


def test_the_status_text_shows_the_denoising_step_and_its_seconds():
    """What the panel's progress bar says (GenerationJob.status_text / progress_fraction) as the events the
    backend writes arrive: the seconds of the last step once the backend has timed one; nothing from an older
    backend that sends no seconds_per_step."""
    job = client.GenerationJob(worker=None, params={}, out_dir=os.path.abspath("out"))
    job.state = "running"
    seen = []
    for stage, step, total, seconds in (("loading", 0, 1, None), ("denoising", 1, 50, None), ("denoising", 2, 50, 0.8),
                                        ("denoising", 12, 50, 1.25), ("denoising", 13, 50, 12.4),
                                        ("denoising", 14, 50, 0.04), ("denoising", 15, 50, 0.001), ("decoding", 0, 1, None)):
        job._handle(protocol.parse_event(protocol.encode(
            protocol.progress_event(job.id, stage, step, total, seconds_per_step=seconds))))
        seen.append((job.status_text, job.progress_fraction))
    assert seen == [("Loading", 0.0), ("Denoising 1/50", 0.02), ("Denoising 2/50 · 0.8 s/step", 0.04),
                    ("Denoising 12/50 · 1.2 s/step", 0.24), ("Denoising 13/50 · 12 s/step", 0.26),
                    ("Denoising 14/50 · 0.04 s/step", 0.28), ("Denoising 15/50 · <0.01 s/step", 0.3),
                    ("Decoding", 0.0)]
    job._handle({"event": "progress", "job": job.id, "stage": "denoising", "step": 3, "total": 50, "preview": None,
                 "seconds_per_step": "fast"})  # not a number: ignored, not drawn
    assert job.status_text == "Denoising 3/50"


def test_an_interpreter_that_cannot_start_is_one_sentence(tmp_path):
    worker = client.BackendWorker(["/no/such/python", "-m", "backend"], dict(os.environ), str(tmp_path), str(tmp_path / "log.txt"))
    job = client.GenerationJob(worker, {"prompt": "x"}, str(tmp_path / "out"))
    job.start()
    assert job.state == "error" and "could not be started" in job.error
