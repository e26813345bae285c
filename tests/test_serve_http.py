"""``python -m backend serve --ray``: the HTTP API on a local Ray Serve deployment (2 CPU replicas, loopback only,
the tiny model), and the add-on's Server client (blender_addon/core/server_client.py) against it.

The server refuses requests without or with a wrong token (401), bad bodies (400, one sentence) and oversized
ones (413); a job's events stream to done and its files arrive with matching SHA-256 into the local job folder;
a cancel mid-job ends it cancelled with nothing written; 50 concurrent clients lose no job and no event. The
flags are checked before Ray starts."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from backend.app import cli, http_api
from syncsphere.blender_addon.core import session
from syncsphere.blender_addon.core.server_client import ServerBackend, ServerWorker, check_server
from syncsphere.blender_addon.core.worker_client import GenerationJob, WorkerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token-" + "k" * 32
TILE_FILES = {"panorama.png", "panorama.exr", "metadata.json"}
CLIENTS = 50
"""The load test's concurrent clients, each with one job."""
LOAD_TIMEOUT_S = 600
"""The load test stops by itself after this long, failing, whatever the server does."""


def job_params(tiny_model, seed=1, **overrides):
    """A 1-step 128x128 tile job on the tiny model, on the CPU."""
    return {"prompt": f"a harbour {seed}", "layout": "tile", "width": 128, "height": 128, "steps": 1, "window": 16,
            "stride": 8, "seed": seed, "model": tiny_model, "device": "cpu", **overrides}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(token_file, out_dir, port, log_path):
    """``python -m backend serve --ray`` as a user starts it (2 CPU replicas); returns the process once its API
    answers, or fails with the end of its log."""
    command = [sys.executable, "-m", "backend", "serve", "--ray", "--token-file", str(token_file), "--port", str(port),
               "--out", str(out_dir), "--cpu", "--replicas", "2"]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if b"serving on http://127.0.0.1:" in open(log_path, "rb").read():
            return process
        time.sleep(1)
    process.kill()
    pytest.fail(f"the server did not start: {open(log_path, 'rb').read()[-3000:].decode(errors='replace')}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """A running server on a free loopback port: (base URL, its job folder)."""
    pytest.importorskip("ray.serve")
    folder = tmp_path_factory.mktemp("serve")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    process = start_server(token_file, folder / "jobs", port, folder / "server.log")
    yield f"http://127.0.0.1:{port}", folder / "jobs"
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def call(url, method="GET", body=None, token=TOKEN, headers=None, timeout=30):
    """(HTTP status, the answer's bytes) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def events_of(url, job, start=0, token=TOKEN, timeout=120):
    """Every event of the job's stream from ``start`` to its end (keep-alive lines skipped)."""
    status, body = call(f"{url}/v1/jobs/{job}/events?from={start}", token=token, timeout=timeout)
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def test_requests_without_or_with_a_wrong_token_are_refused(server):
    url, _ = server
    for token, headers in ((None, {}), ("wrong-" + TOKEN, {}), (TOKEN[:-1], {}), (None, {"Authorization": TOKEN}),
                           (None, {"Authorization": f"Basic {TOKEN}"})):
        for method, path, body in (("GET", "/v1/hello", None), ("POST", "/v1/jobs", {"prompt": "x"}),
                                   ("GET", "/v1/jobs/job-0/events", None)):
            status, answer = call(url + path, method, body, token=token, headers=headers)
            assert status == 401, (token, headers, path)
            assert json.loads(answer) == {"error": "This server needs its token: send the header Authorization: "
                                                   "Bearer TOKEN."}
    status, answer = call(url + "/v1/hello")
    assert status == 200 and json.loads(answer)["event"] == "ready" and json.loads(answer)["protocol"] == 3


@pytest.mark.parametrize("body, sentence", [
    (b'{"prompt": "a harbour"', "The body is not valid JSON."),
    (b"[1, 2]", "A job's params must be a JSON object."),
    (b'{"prompt": "x", "bogus": 1}', "Unknown parameter(s): bogus."),
    (b'{"prompt": "x", "width": -8}', "The width -8 px is outside 1..16384 px."),
    (b'{"prompt": "x", "out": "/tmp/elsewhere"}', "A job has no out: the server writes it into a folder of its own, "
                                                  "and GET /v1/jobs/ID/files sends its files."),
    (b'\xff\xfe{}', "The body is not valid UTF-8 (it looks like UTF-16): byte 0xff at offset 0; send UTF-8 JSON."),
])
def test_bad_bodies_get_400_with_one_sentence(server, body, sentence):
    url, _ = server
    status, answer = call(url + "/v1/jobs", "POST", body, headers={"Content-Type": "application/json"})
    assert (status, json.loads(answer)) == (400, {"error": sentence})


def test_an_oversized_body_gets_413_and_unknown_jobs_404(server):
    url, _ = server
    status, answer = call(url + "/v1/jobs", "POST", json.dumps({"prompt": "x" * 70000}).encode())
    assert status == 413 and "longer than 65536 bytes" in json.loads(answer)["error"]
    assert call(url + "/v1/jobs/job-nope/events")[0] == 404
    assert call(url + "/v1/jobs/job-nope/cancel", "POST")[0] == 404


def test_a_job_streams_to_done_and_its_files_arrive_with_matching_sha256(server, tiny_model, tmp_path):
    """Through the add-on's client: the same GenerationJob as for a local or SSH worker."""
    url, jobs_dir = server
    worker = ServerWorker(ServerBackend(url, token=TOKEN), str(tmp_path / "backend.log"))
    job = GenerationJob(worker, job_params(tiny_model, steps=2), str(tmp_path / "world-1"), hang_timeout_s=120)
    job.start()
    assert job.state == "running", job.error
    assert job.wait(timeout_s=180) and job.state == "done", job.error
    server_id, server_folder = worker.jobs[job.id]
    assert server_folder == str(jobs_dir / server_id)
    assert set(os.listdir(tmp_path / "world-1")) == TILE_FILES
    assert job.outputs["png"] == str(tmp_path / "world-1" / "panorama.png")
    # The files' events carry the SHA-256 of the server's files, and the received files match them byte for byte.
    status, body = call(f"{url}/v1/jobs/{server_id}/files")
    events = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and [event["event"] for event in events if event["event"] != "chunk"] == ["file"] * 3 + ["fetched"]
    for event in events:
        if event["event"] == "file":
            local = tmp_path / "world-1" / os.path.basename(event["path"])
            assert hashlib.sha256(local.read_bytes()).hexdigest() == event["sha256"]
            assert local.read_bytes() == open(event["path"], "rb").read()
    # The stream read again from the start gives the same events, ending with done; none lost.
    replay = events_of(url, server_id)
    assert [event["event"] for event in replay][-1] == "done"
    assert [event["step"] for event in replay if event.get("stage") == "denoising"] == [1, 2]
    assert events_of(url, server_id, start=3) == replay[3:]  # a client that lost the stream resumes where it was


def test_a_cancel_mid_job_ends_it_cancelled_with_nothing_written(server, tiny_model, tmp_path):
    url, jobs_dir = server
    worker = ServerWorker(ServerBackend(url, token=TOKEN), str(tmp_path / "backend.log"))
    job = GenerationJob(worker, job_params(tiny_model, steps=500, width=256, height=256),
                        str(tmp_path / "long"), hang_timeout_s=120)
    job.start()
    deadline = time.monotonic() + 120
    while not job.poll(wait_s=0.5) and job.stage != "denoising" and time.monotonic() < deadline:
        pass
    assert job.stage == "denoising", job.error
    job.cancel()
    assert job.wait(timeout_s=120) and job.state == "cancelled", job.error
    server_id, server_folder = worker.jobs[job.id]
    assert events_of(url, server_id)[-1] == {"event": "error", "job": server_id, "kind": "cancelled",
                                             "message": "The job was cancelled."}
    # Its replica stopped it: the next job on the same replicas runs, and the long one never wrote its files.
    after = GenerationJob(worker, job_params(tiny_model, seed=2), str(tmp_path / "after"), hang_timeout_s=120)
    after.start()
    after.wait(timeout_s=120)
    after_second = GenerationJob(worker, job_params(tiny_model, seed=3), str(tmp_path / "after2"), hang_timeout_s=120)
    after_second.start()
    assert after_second.wait(timeout_s=120) and (after.state, after_second.state) == ("done", "done")
    assert not os.path.exists(os.path.join(server_folder, "panorama.png")) and not os.path.exists(tmp_path / "long")


def test_the_client_refuses_a_wrong_token_and_never_shows_it(server, tmp_path):
    url, _ = server
    wrong = ServerBackend(url, token="not-the-" + TOKEN)
    assert TOKEN not in repr(wrong) and "not-the-" not in repr(wrong)
    worker = ServerWorker(wrong, str(tmp_path / "backend.log"))
    with pytest.raises(WorkerError, match=r"refused the token \(HTTP 401\): check the Server Token"):
        worker.start()
    assert "not-the-" not in (tmp_path / "backend.log").read_text()
    ok, text = check_server(ServerBackend(url, token_file=str(tmp_path / "missing-token")))
    assert not ok and text.startswith("The Server Token File ") and "cannot be read" in text
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    ok, text = check_server(ServerBackend(url, token_file=str(token_file)))
    assert ok and text.startswith("Server 127.0.0.1:") and "protocol 3" in text and "device cpu" in text
    nowhere = ServerWorker(ServerBackend(f"http://127.0.0.1:{free_port()}", token=TOKEN), str(tmp_path / "log"))
    with pytest.raises(WorkerError, match=r"^The server at 127\.0\.0\.1:\d+ cannot be reached \(.*\); see the log at "):
        nowhere.start()
    assert ServerBackend("http://gpu.studio:8600", token=TOKEN).problem().startswith(
        "The Server URL http://gpu.studio:8600 is plain http to another machine")
    assert ServerBackend("gpu.studio", token=TOKEN).problem().startswith("The Server URL must look like https://")
    assert ServerBackend("https://gpu.studio", token=" ").problem().startswith("No server token is set")


def test_the_session_keeps_one_server_worker(server, tmp_path):
    url, _ = server
    backend = ServerBackend(url, token=TOKEN)
    worker = session.get_worker(None, None, REPO, str(tmp_path / "log"), backend)
    try:
        assert isinstance(worker, ServerWorker)
        assert session.get_worker(None, None, REPO, str(tmp_path / "log"), ServerBackend(url, token=TOKEN)) is worker
    finally:
        session.shutdown()


def run_load(url, tiny_model, clients=CLIENTS, timeout_s=LOAD_TIMEOUT_S):
    """``clients`` threads, each submitting a 1-step job and streaming its events to the end, then reading them again
    from the start. Returns (jobs submitted, {job: streamed events}, {job: replayed events}, failures, seconds)."""
    streamed, replayed, failures, lock = {}, {}, [], threading.Lock()
    start_line = threading.Barrier(clients)

    def client(number):
        try:
            start_line.wait(timeout=60)
            status, answer = call(url + "/v1/jobs", "POST", job_params(tiny_model, seed=number), timeout=60)
            assert status == 202, answer
            job = json.loads(answer)["job"]
            events = events_of(url, job, timeout=timeout_s)
            again = events_of(url, job, timeout=60)
            with lock:
                streamed[job], replayed[job] = events, again
        except Exception as error:  # recorded: the test fails with it
            with lock:
                failures.append(f"client {number}: {type(error).__name__}: {error}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,), daemon=True) for number in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        failures.append("the load test ran past its timeout")
    return clients, streamed, replayed, failures, time.perf_counter() - started


def test_fifty_concurrent_clients_lose_no_job_and_no_event(server, tiny_model):
    url, jobs_dir = server
    clients, streamed, replayed, failures, _ = run_load(url, tiny_model)
    assert failures == []
    assert len(streamed) == clients
    for job, events in streamed.items():
        assert events == replayed[job]
        assert [(event["event"], event.get("stage")) for event in events] == [
            ("progress", "loading"), ("progress", "denoising"), ("progress", "decoding"), ("progress", "writing"),
            ("done", None)]
        assert all(event["job"] == job for event in events)
        assert set(os.listdir(jobs_dir / job)) == TILE_FILES


def test_the_flags_are_checked_before_ray_starts(tmp_path, capsys):
    short = tmp_path / "short"
    short.write_text("abc")
    good = tmp_path / "good"
    good.write_text(TOKEN)
    cases = [
        (["--token-file", str(tmp_path / "missing")], f"error: The token file {tmp_path / 'missing'} cannot be read "
                                                      "(No such file or directory); make one with:"),
        (["--token-file", str(short)], f"error: The token file {short} must hold one token of at least 16 characters"),
        ([], "error: serve --ray needs --token-file FILE: every request must carry that token (docs/running.md)."),
        (["--token-file", str(good), "--host", "0.0.0.0"], "error: --host 0.0.0.0 is not a loopback address, so other "
                                                          "machines could reach the API; pass --allow-remote to mean it"),
        (["--token-file", str(good), "--port", "0"], "error: --port must be between 1 and 65535, not 0."),
    ]
    for host in ("127.0.0.1", "::1", "localhost"):
        http_api.check_host(host, allow_remote=False)  # loopback: no flag needed
    http_api.check_host("0.0.0.0", allow_remote=True)
    for flags, sentence in cases:
        assert cli.main(["serve", "--ray", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(sentence) and err.count("\n") == 1, err


def test_more_jobs_than_the_bound_get_429_until_some_end(server, tiny_model):
    """--max-jobs (64 here, the default) jobs queued or running: one more is refused with 429 and one sentence;
    once they are cancelled, a job is taken again."""
    url, _ = server
    jobs = []
    for number in range(64):
        status, answer = call(url + "/v1/jobs", "POST", job_params(tiny_model, seed=number, steps=500, width=256,
                                                                   height=256))
        assert status == 202, answer
        jobs.append(json.loads(answer)["job"])
    status, answer = call(url + "/v1/jobs", "POST", job_params(tiny_model))
    assert (status, json.loads(answer)) == (429, {"error": "The server has 64 jobs queued or running, its limit; "
                                                           "submit again when one has ended."})
    for job in jobs:
        assert call(f"{url}/v1/jobs/{job}/cancel", "POST")[0] == 202
    for job in jobs:
        assert events_of(url, job)[-1]["kind"] == "cancelled"
    status, answer = call(url + "/v1/jobs", "POST", job_params(tiny_model))
    assert status == 202 and events_of(url, json.loads(answer)["job"])[-1]["event"] == "done"


class TcpRelay:
    """A loopback TCP relay to ``target_port`` on ``port`` (0: a free one), standing in for the network between
    the add-on and the server; ``cut()`` drops every connection and stops listening, as a lost network does."""

    def __init__(self, target_port, port=0):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        for end in [self.listener] + self.sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


def test_a_connection_lost_mid_job_is_one_sentence_and_the_next_job_connects_again(server, tiny_model, tmp_path):
    url, _ = server
    relay = TcpRelay(int(url.rsplit(":", 1)[1]))
    log = tmp_path / "backend.log"
    worker = ServerWorker(ServerBackend(f"http://127.0.0.1:{relay.port}", token=TOKEN), str(log))
    job = GenerationJob(worker, job_params(tiny_model, steps=500, width=256, height=256), str(tmp_path / "long"),
                        hang_timeout_s=120)
    job.start()
    deadline = time.monotonic() + 120
    while not job.poll(wait_s=0.5) and job.stage != "denoising" and time.monotonic() < deadline:
        pass
    assert job.stage == "denoising", job.error
    relay.cut()
    assert job.wait(timeout_s=120) and job.state == "error"
    # What the client saw first (an early end of the stream, or a reset), then "cannot be reached" on reconnecting.
    assert re.fullmatch(rf"The connection to the server at 127\.0\.0\.1:{relay.port} was lost \((the server ended "
                        r"the stream early|the stream was cut: \w+)\); the next job connects again; see the log at "
                        + re.escape(str(log)) + r"\.", job.error), job.error
    assert not os.path.exists(tmp_path / "long") and TOKEN not in log.read_text()
    assert call(f"{url}/v1/jobs/{worker.jobs[job.id][0]}/cancel", "POST")[0] == 202  # it ran on: stop it there
    # The network is back (on the same port): the next job on the same worker connects again and completes.
    relay = TcpRelay(int(url.rsplit(":", 1)[1]), port=relay.port)
    try:
        after = GenerationJob(worker, job_params(tiny_model, seed=5), str(tmp_path / "after"), hang_timeout_s=120)
        after.start()
        assert after.wait(timeout_s=120) and after.state == "done", after.error
        assert set(os.listdir(tmp_path / "after")) == TILE_FILES
    finally:
        relay.cut()
