"""``python -m backend batch`` on a local Ray cluster of 2 CPUs: every job finished once, a worker killed
mid-job has its job retried on another with nothing half-written, a re-run skips what is finished; the jobs
file is checked before anything starts, and a Python without Ray gets one sentence."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from backend.app import batch
from backend.errors import BadRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE_FILES = {"panorama.png", "panorama.exr", "metadata.json"}


def job_line(tiny_model, seed, **overrides):
    return {"prompt": f"a harbour {seed}", "layout": "tile", "width": 128, "height": 128, "steps": 1, "window": 16,
            "stride": 8, "seed": seed, "model": tiny_model, **overrides}


def write_jobs(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_the_batch_command_runs_a_jobs_file_and_a_rerun_skips_it(tmp_path, tiny_model):
    """The command as a user runs it (its own local cluster, started and stopped): a summary line, exit 0."""
    pytest.importorskip("ray")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(tiny_model, seed) for seed in range(1, 4)])
    command = [sys.executable, "-m", "backend", "batch", jobs, "--out", str(tmp_path / "out"), "--cpu", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "batch: 3 done in " in first.stderr and "0 skipped (finished before), 0 failed" in first.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["job-0001", "job-0002", "job-0003"]
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "batch: 0 done in " in second.stderr and "3 skipped" in second.stderr


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs on 127.0.0.1 (no dashboard), for the module."""
    ray = pytest.importorskip("ray")
    batch.start_ray(None, 2, cpu=True)
    yield ray
    ray.shutdown()


def test_a_batch_survives_a_killed_worker_and_a_rerun_skips_it(local_ray, tiny_model, tmp_path):
    # The first job is slow enough to be killed mid-job; seven jobs in all, on two workers.
    lines = [job_line(tiny_model, 0, steps=60, id="slow")] + [job_line(tiny_model, seed) for seed in range(1, 7)]
    jobs = batch.read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines), str(tmp_path / "out"), cpu=True)
    out = tmp_path / "out"
    out.mkdir()
    started, killed = [], []

    def kill_the_slow_jobs_worker(job_id, pid):
        started.append(job_id)
        if job_id == "slow" and not killed:
            killed.append(pid)
            threading.Timer(1.5, os.kill, (pid, signal.SIGKILL)).start()

    summary = batch.run_batch(jobs, str(out), workers=2, cpu=True, progress=False, on_start=kill_the_slow_jobs_worker)
    assert killed and summary.retried == 1 and not summary.failed
    assert started.count("slow") == 2  # started, its worker killed, started again on another
    assert sorted(summary.done) == sorted(job.id for job in jobs) and len(summary.done) == 7  # each once
    # Every job's folder holds its whole set and nothing else; nothing hidden is left beside them.
    assert sorted(os.listdir(out)) == sorted(job.id for job in jobs)
    for job in jobs:
        assert set(os.listdir(out / job.id)) == TILE_FILES
        metadata = json.loads((out / job.id / "metadata.json").read_text())
        assert metadata["seed"] == job.params["seed"] and metadata["params"]["steps"] == job.params["steps"]
    before = {job.id: (out / job.id / "panorama.png").read_bytes() for job in jobs}

    started.clear()
    again = batch.run_batch(jobs, str(out), workers=2, cpu=True, progress=False, on_start=kill_the_slow_jobs_worker)
    assert sorted(again.skipped) == sorted(before) and not again.done and not started
    assert {job.id: (out / job.id / "panorama.png").read_bytes() for job in jobs} == before


def test_a_failing_job_is_reported_and_the_rest_finish(local_ray, tiny_model, tmp_path):
    lines = [job_line(tiny_model, 1, id="good"), job_line("/no/such/model", 2, id="missing-model")]
    jobs = batch.read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines), str(tmp_path / "out"), cpu=True)
    summary = batch.run_batch(jobs, str(tmp_path / "out"), workers=1, cpu=True, progress=False)
    assert summary.done == ["good"] and list(summary.failed) == ["missing-model"]
    assert "/no/such/model" in summary.failed["missing-model"]
    assert os.listdir(tmp_path / "out") == ["good"]


def test_the_jobs_file_is_checked_before_anything_starts(tmp_path, tiny_model):
    good = job_line(tiny_model, 1)
    cases = [("not json\n", "line 1 is not a JSON object"),
             (json.dumps(good) + "\n" + json.dumps({**good, "steps": 0}) + "\n", "line 2: --steps must be at least 1"),
             (json.dumps({**good, "id": "a"}) + "\n" + json.dumps({**good, "id": "a"}) + "\n", "the id a is used twice"),
             (json.dumps({**good, "id": "../up"}) + "\n", "the id must be a folder name"),
             (json.dumps({**good, "out": "/x"}) + "\n", "a job has no out"),
             ("# only a comment\n\n", "has no jobs")]
    for text, words in cases:
        (tmp_path / "jobs.jsonl").write_text(text)
        with pytest.raises(BadRequest, match=words.replace("-", r"\-")):
            batch.read_jobs(str(tmp_path / "jobs.jsonl"), str(tmp_path / "out"))
    (tmp_path / "jobs.jsonl").write_text("# a comment\n" + json.dumps(good) + "\n")
    [job] = batch.read_jobs(str(tmp_path / "jobs.jsonl"), str(tmp_path / "out"), cpu=True)
    assert job.id == "job-0002" and job.params["device"] == "cpu" and job.params["preview_every"] == 0


def test_without_ray_the_batch_command_is_one_sentence(tmp_path, tiny_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(tiny_model, 1)])
    code = ("import sys; sys.modules['ray'] = None  # as in a Python without Ray\n"
            f"from backend.app.cli import main; sys.exit(main(['batch', {jobs!r}, '--out', {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {batch.RAY_MISSING}"
    assert not (tmp_path / "out").exists()
