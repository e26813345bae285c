"""The remote backend over SSH: the add-on's worker client runs ``ssh HOST python -m backend serve --stdio`` and
gets the job's files back through the protocol (fetch: chunks with a SHA-256 per file).

The SSH path is real where it can be: an ``sshd`` of the test's own on 127.0.0.1 (a free port, its own host
key and an authorised key made for the test; nothing else can log in). Where sshd cannot run, the same client
code goes through a stand-in ``ssh`` that runs the remote command with ``sh`` here. A bad network is
``tests/channel_relay.py`` put in front of the worker as its Remote Python: it damages a chunk, or drops the
connection mid-transfer.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from syncsphere.backend import protocol
from syncsphere.blender_addon.core import backend_command as commands
from syncsphere.blender_addon.core import remote_files
from syncsphere.blender_addon.core import worker_client as client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSHD = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")

FAKE_SSH = """#!/bin/sh
# A stand-in for ssh: skip the options and the host, run the remote command with sh on this machine.
while [ $# -gt 0 ]; do case "$1" in --) shift; break;; -o|-p|-i|-l|-F) shift 2;; *) shift;; esac; done
shift
exec sh -c "$*"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_sshd(folder):
    """An sshd on 127.0.0.1 that lets in only a key made here; returns (process, ssh options) or None where
    sshd cannot run (not installed, no privilege-separation folder)."""
    if SSHD is None or (os.geteuid() == 0 and not os.path.isdir("/run/sshd")):
        return None
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1:{port}\nHostKey {folder / 'host_key'}\n"
                      f"AuthorizedKeysFile {folder / 'user_key.pub'}\nStrictModes no\nPasswordAuthentication no\n"
                      f"KbdInteractiveAuthentication no\nUsePAM no\nPidFile {folder / 'sshd.pid'}\n")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(folder / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            options = (f"-F /dev/null -p {port} -i {folder / 'user_key'} -o IdentitiesOnly=yes "
                       "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
            return process, options
        except OSError:
            time.sleep(0.1)
    process.kill()
    return None


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    """(ssh program, host, ssh options): a real sshd on 127.0.0.1 where it runs, else the stand-in ssh."""
    folder = tmp_path_factory.mktemp("ssh")
    started = start_sshd(folder)
    if started is not None:
        process, options = started
        yield "ssh", "127.0.0.1", options
        process.terminate()
        process.wait()
        return
    fake = folder / "ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    yield str(fake), "gpu-box", ""


def remote_backend(ssh_host, tmp_path, python=sys.executable):
    ssh, host, options = ssh_host
    return commands.RemoteBackend(host=host, python=python, folder=REPO, output_dir=str(tmp_path / "remote-outputs"),
                                  ssh_options=options, ssh=ssh)


def remote_worker(remote, tmp_path):
    command = remote.command(allow_network=False)
    return client.BackendWorker(command, None, REPO, str(tmp_path / "logs" / "backend.log"), remote)


def relay_python(tmp_path, *relay_args):
    """A Remote Python that puts tests/channel_relay.py (with ``relay_args``) between the worker and ssh."""
    script = tmp_path / "relayed-python"
    relay = os.path.join(REPO, "tests", "channel_relay.py")
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {relay} {" ".join(relay_args)} -- {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def params(tiny_model, **overrides):
    return {"prompt": "a harbour", "layout": "tile", "width": 128, "height": 128, "steps": 2, "window": 16,
            "stride": 8, "seed": 4, "device": "cpu", "model": tiny_model, **overrides}


def leftovers(folder):
    """Hidden transfer folders left beside the job folders."""
    return [name for name in os.listdir(folder) if remote_files.FETCH_MARK in name] if os.path.isdir(folder) else []


def test_a_job_on_a_remote_backend_comes_back_into_the_local_job_folder(ssh_host, tiny_model, tmp_path):
    remote = remote_backend(ssh_host, tmp_path)
    ok, text = commands.run_remote_backend(remote, "info", allow_network=False)  # Check Backend
    assert ok and '"device": "cpu"' in text, text

    worker = remote_worker(remote, tmp_path)
    try:
        local = tmp_path / "local" / "20250101-120000-a-harbour-4"
        job = client.GenerationJob(worker, params(tiny_model, layout="equirect", width=256, height=128), str(local))
        job.start()
        stages = set()
        while not job.poll(wait_s=0.5):
            stages.add(job.stage)
        assert job.state == "done", job.error
        assert "receiving" in stages
        # The outputs name local files, byte for byte the ones the backend wrote on its machine.
        remote_dir = os.path.join(remote.output_dir, local.name)
        paths = [job.outputs[key] for key in ("png", "exr", "metadata", "dice", "horizon", "exr_sky", "lighting")]
        paths += list(job.outputs["faces"].values())
        assert len(paths) == 13 and all(os.path.dirname(path) == str(local) for path in paths)
        for path in paths:
            with open(path, "rb") as here, open(os.path.join(remote_dir, os.path.basename(path)), "rb") as there:
                assert here.read() == there.read()
        assert sorted(os.listdir(local)) == sorted(os.path.basename(path) for path in paths)
        assert not leftovers(local.parent)
        assert job.preview is None  # the backend's previews are on its machine, not here
    finally:
        worker.stop(grace_s=5)


def test_a_damaged_file_is_one_sentence_and_nothing_is_left(ssh_host, tiny_model, tmp_path):
    python = relay_python(tmp_path, "--corrupt-once", str(tmp_path / "corrupted"))
    worker = remote_worker(remote_backend(ssh_host, tmp_path, python), tmp_path)
    try:
        local = tmp_path / "local" / "damaged"
        job = client.GenerationJob(worker, params(tiny_model), str(local))
        job.start()
        assert job.wait(120) and job.state == "error"
        assert "arrived damaged: its SHA-256 does not match" in job.error and "nothing was written" in job.error
        assert not local.exists() and not leftovers(local.parent)
        # The connection is still up: the next job comes back whole.
        after = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "local" / "after"))
        after.start()
        assert after.wait(120) and after.state == "done", after.error
        assert os.path.isfile(after.outputs["png"]) and not leftovers(local.parent)
    finally:
        worker.stop(grace_s=5)


def test_a_connection_dropped_mid_transfer_leaves_nothing_and_the_next_job_reconnects(ssh_host, tiny_model, tmp_path):
    python = relay_python(tmp_path, "--drop-once", str(tmp_path / "dropped"))
    worker = remote_worker(remote_backend(ssh_host, tmp_path, python), tmp_path)
    try:
        local = tmp_path / "local" / "dropped"
        job = client.GenerationJob(worker, params(tiny_model), str(local))
        job.start()
        assert job.wait(120) and job.state == "error"
        assert "connection to the backend on" in job.error and "lost while the job's files came back" in job.error
        assert "the next job connects again" in job.error and worker.log_path in job.error
        assert not local.exists() and not leftovers(local.parent)
        assert not worker.is_alive()

        after = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "local" / "after"))
        after.start()
        assert after.wait(120) and after.state == "done", after.error
        assert os.path.isfile(after.outputs["png"])
    finally:
        worker.stop(grace_s=5)


def test_a_connection_dropped_mid_job_is_one_sentence_and_the_next_job_reconnects(ssh_host, tiny_model, tmp_path):
    worker = remote_worker(remote_backend(ssh_host, tmp_path), tmp_path)
    try:
        job = client.GenerationJob(worker, params(tiny_model, steps=500), str(tmp_path / "local" / "long"))
        job.start()
        while job.stage != "denoising" and not job.finished:
            job.poll(wait_s=0.5)
        ssh_process = worker.process
        ssh_process.kill()  # the local ssh dies: the connection is gone
        assert job.wait(60) and job.state == "error"
        assert job.error.startswith("The connection to the backend on ") and "the next job connects again" in job.error
        assert not (tmp_path / "local" / "long").exists()

        after = client.GenerationJob(worker, params(tiny_model), str(tmp_path / "local" / "after"))
        after.start()
        assert after.wait(120) and after.state == "done", after.error
        assert worker.process is not ssh_process
    finally:
        worker.stop(grace_s=5)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client on this machine")
def test_an_unreachable_host_is_one_sentence_with_what_ssh_said(tmp_path):
    remote = commands.RemoteBackend(host="127.0.0.1", python="python3", folder="/opt/syncsphere",
                                    output_dir="/tmp/out", ssh_options=f"-F /dev/null -p {free_port()} -o ConnectTimeout=5")
    worker = remote_worker(remote, tmp_path)
    job = client.GenerationJob(worker, {"prompt": "x"}, str(tmp_path / "out"))
    job.start()
    assert job.state == "error", job.error
    assert job.error.startswith("The backend on 127.0.0.1 did not start properly (it exited with code 255, saying ")
    assert "Connection refused" in job.error and worker.log_path in job.error
    ok, text = commands.run_remote_backend(remote, "info")
    assert not ok and "Connection refused" in text


def test_the_ssh_command_quotes_the_remote_paths_and_says_what_is_missing():
    remote = commands.RemoteBackend(host="me@gpu-box", python="~/venvs/sd env/bin/python", folder="/opt/sync sphere",
                                    output_dir="/data/out", cache_dir="~/hf", ssh_options="-p 2222 -i '/keys/my key'")
    argv = remote.command(allow_network=False)
    assert argv[:len(commands.SSH_OPTIONS) + 1] == ["ssh", *commands.SSH_OPTIONS]
    assert argv[len(commands.SSH_OPTIONS) + 1:-1] == ["-p", "2222", "-i", "/keys/my key", "--", "me@gpu-box"]
    assert argv[-1] == ("cd '/opt/sync sphere' && exec env PYTHONPATH='/opt/sync sphere' PYTHONIOENCODING=utf-8 "
                        "PYTHONUNBUFFERED=1 HF_HOME=\"$HOME\"/hf HF_HUB_OFFLINE=1 \"$HOME\"/'venvs/sd env/bin/python' "
                        "-m backend serve --stdio")
    assert remote.job_folder("/home/artist/outputs/20250101-a-b-1") == "/data/out/20250101-a-b-1"
    assert remote.problem() is None
    problems = {"host": "No SSH host is set", "python": "No Remote Python is set",
                "folder": "No Remote SyncSphere Folder is set", "output_dir": "must be an absolute path",
                "ssh_options": "cannot be read"}
    for field, words in problems.items():
        value = {"output_dir": "outputs", "ssh_options": "-i 'unclosed"}.get(field, " ")
        assert words in commands.RemoteBackend(**{**vars(remote), field: value}).problem()


def test_received_files_refuse_paths_outside_the_jobs_folder_and_short_files(tmp_path):
    local = tmp_path / "job"
    for path in ("/remote/other/panorama.png", "/remote/job/../x.png", "relative.png", "/remote/job"):
        received = remote_files.ReceivedFiles("/remote/job", str(local))
        with pytest.raises(remote_files.TransferError, match="not in the job's folder"):
            received.add(protocol.file_event("j", path, 3, "0" * 64, 1, 1))
    received = remote_files.ReceivedFiles("/remote/job", str(local))
    received.add(protocol.file_event("j", "/remote/job/a.png", 4, "0" * 64, 1, 1))
    received.add(protocol.chunk_event("j", "/remote/job/a.png", 0, b"abc"))
    with pytest.raises(remote_files.TransferError, match="arrived incomplete"):
        received.commit(protocol.fetched_event("j", 1, 3), {"png": "/remote/job/a.png"})
    assert not local.exists() and not leftovers(tmp_path)


def test_the_worker_sends_only_the_files_of_its_own_finished_jobs():
    """A fetch for a job the worker did not finish is refused; the request itself is protocol."""
    from backend.app.server import StdioServer
    import io

    request = protocol.fetch_request("job-1")
    assert protocol.parse_request(protocol.encode(request)) == request
    events = io.BytesIO()
    server = StdioServer(io.BytesIO(protocol.encode(request).encode() + b"\n"), events)
    server.serve()
    event = protocol.parse_event(events.getvalue().decode().strip())
    assert event["event"] == "error" and event["job"] == "job-1" and event["kind"] == "bad_request"
    assert event["message"].startswith("No finished job 'job-1' to send the files of")
