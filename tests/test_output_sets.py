"""Output folders: --out problems are one sentence before the model loads, a full disk writes nothing, every
--json-progress run ends with done or error, a set of files replaces the old one as a unit even when the
process is killed at any step of writing (SIGKILL, SIGTERM, SIGINT), and two runs into one folder do not
mix (backend/products/files.py).

The runs are real CLI processes. Kills at each step of writing come from a driver process that forks one
child per step: the child counts the file-system calls of the writing (os.mkdir, rename, replace, remove,
unlink, rmdir, the folder exchange and the image writers) and sends itself the signal right after the
N-th, for N = 1, 2, ... until a run finishes before its N-th call. Nothing waits on the clock.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "2", "--window", "16", "--stride", "8", "--device", "cpu"]
TIMEOUT = 600  # generous: the machine may be loaded; nothing here synchronises on time


def generate_args(tiny_model, out, *extra):
    """``generate`` flags of a small tile job into ``out``."""
    return ["generate", "--prompt", "x", "--model", tiny_model, "--out", str(out), "--layout", "tile",
            "--width", "128", "--height", "128", *FAST, *extra]


def run_python(code, *args, **popen):
    """Run ``python -c code args`` with the repository importable; the CompletedProcess (text)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=TIMEOUT, **popen)


CLI = "import sys\nfrom backend.app.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def events_of(stdout):
    """The protocol events of a --json-progress run's stdout (every line must be one)."""
    return [json.loads(line) for line in stdout.splitlines()]


def last_error_line(stderr):
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def digests(folder):
    """{name: sha256} of the files in ``folder``; None when it does not exist."""
    if not os.path.isdir(folder):
        return None
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in os.listdir(folder)}


# ---------------------------------------------------------------- 6. --out problems, a full disk


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs mounted with ``options`` (e.g. "ro,size=64k"); skips the test
    where this process may not mount (not root, or no CAP_SYS_ADMIN). Unmounted afterwards."""
    mounted = []

    def mount(options):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def _read_only_parent(tmp_path, mount_tmpfs):
    """A folder nobody can write into: a read-only tmpfs as root (where chmod restricts nothing), else 0o555."""
    if os.geteuid() == 0:
        return mount_tmpfs("ro,size=64k")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _out_problem(case, tmp_path, mount_tmpfs):
    """(the --out of ``case``, the folder that must stay as it was, what the sentence says)."""
    if case == "under a regular file":
        (tmp_path / "file.txt").write_text("a file")
        return tmp_path / "file.txt" / "sub", tmp_path, "file.txt is a file, not a folder"
    if case == "name of 300 characters":
        return tmp_path / ("n" * 300), tmp_path, "is 300 bytes long"
    if case == "read-only file system or folder":
        parent = _read_only_parent(tmp_path, mount_tmpfs)
        return parent / "out", parent, "read-only file system" if os.geteuid() == 0 else "permission denied"
    if os.geteuid() == 0:
        pytest.skip("root may write into any folder")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)  # an existing --out the user cannot write into
    return out, tmp_path, "permission denied"


@pytest.mark.parametrize("case", ["under a regular file", "name of 300 characters", "read-only file system or folder",
                                  "existing folder without write permission"])
def test_out_problems_are_one_sentence_before_the_model_loads(tiny_model, tmp_path, mount_tmpfs, case):
    out, parent, expected = _out_problem(case, tmp_path, mount_tmpfs)
    before = sorted(os.listdir(parent))
    result = run_python(CLI, *generate_args(tiny_model, out, "--json-progress"))
    events = events_of(result.stdout)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and last_error_line(result.stderr).startswith("error: ")
    assert expected in last_error_line(result.stderr)
    # Refused before the model loads: the only event is the error, no "loading" progress.
    assert [event["event"] for event in events] == ["error"] and events[0]["kind"] == "bad_request"
    assert sorted(os.listdir(parent)) == before  # no folder, lock file or hidden folder left


def test_a_disk_that_fills_up_while_writing_is_one_sentence_and_writes_nothing(tiny_model, mount_tmpfs):
    # A real full disk: a tmpfs too small for the job's EXR (a 128x128 float32 RGB image is 192 KiB).
    disk = mount_tmpfs("size=64k")
    out = disk / "out"
    result = run_python(CLI, *generate_args(tiny_model, out, "--json-progress"))
    events = events_of(result.stdout)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    sentence = f"The disk is full (No space left on device): nothing was written into {out}."
    assert last_error_line(result.stderr) == f"error: {sentence}"
    assert events[-1] == {"event": "error", "job": None, "kind": "internal", "message": sentence}
    assert os.listdir(disk) == []  # not even a hidden folder or the lock file


def test_a_full_disk_leaves_the_old_set_untouched(tmp_path, monkeypatch):
    """Without a real small disk (no root): ENOSPC injected at the image writer, in-process."""
    import errno

    import backend.products.images as images
    from backend.errors import SyncSphereError
    from backend.products.outputs import write_job_outputs

    out = tmp_path / "out"
    image = np.full((16, 32, 3), 0.5, np.float32)
    write_job_outputs(str(out), image, {"run": "old"}, cube_map=True)
    old = digests(out)

    def full_disk(path, data):
        with open(path, "w") as f:
            f.write("{half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(images, "write_json", full_disk)
    with pytest.raises(SyncSphereError, match=r"^The disk is full \(No space left on device\): nothing was written"):
        write_job_outputs(str(out), image * 0.5, {"run": "new"}, cube_map=True)
    assert digests(out) == old and os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------- 7. every --json-progress run ends with done or error

FAIL_WHILE_DENOISING = """
import os, signal, sys
import backend.app.job as job
def generate_image(*args, **kwargs):
    {action}
job.generate_image = generate_image
from backend.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_json_progress_ends_with_an_internal_error_event_for_a_bug(tiny_model, tmp_path):
    code = FAIL_WHILE_DENOISING.format(action='raise RuntimeError("tensor shapes\\n do not match")')
    result = run_python(code, *generate_args(tiny_model, tmp_path / "out", "--json-progress"))
    events = events_of(result.stdout)
    assert result.returncode == 1
    message = "Internal error (RuntimeError: tensor shapes do not match); see the traceback on stderr."
    assert events[-1] == {"event": "error", "job": None, "kind": "internal", "message": message}
    assert "Traceback" in result.stderr and last_error_line(result.stderr) == f"error: {message}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_json_progress_ends_with_a_cancelled_event_when_interrupted(tiny_model, tmp_path, signal_name):
    code = FAIL_WHILE_DENOISING.format(action=f"os.kill(os.getpid(), signal.{signal_name}); sum(range(10))")
    result = run_python(code, *generate_args(tiny_model, tmp_path / "out", "--json-progress"))
    events = events_of(result.stdout)
    assert result.returncode == 130, result.stderr
    message = "Interrupted; nothing was written."
    assert events[-1] == {"event": "error", "job": None, "kind": "cancelled", "message": message}
    assert "Traceback" not in result.stderr and last_error_line(result.stderr) == f"error: {message}"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- 9. a set is replaced as a unit, killed anywhere

KILL_DRIVER = r'''
import hashlib, json, os, shutil, signal, sys, traceback
config = json.loads(sys.argv[1])
import backend.app.cli as cli
import backend.products.files as files
import backend.products.images as images

WORK, COMMAND = config["work"], config["command"]
SPACE = os.path.join(WORK, "space")  # holds --out and nothing else, so its hidden leftovers show
OUT = os.path.join(SPACE, "out")
FS_CALLS = ("mkdir", "rename", "replace", "remove", "unlink", "rmdir")


def command(panorama, out, overwrite):
    extra = ["--face-size", "8"] if COMMAND == "cubemap" else []
    return [COMMAND, panorama, "--out", out, *extra, *(["--overwrite"] if overwrite else [])]


def run(argv, kill=None, n=0):
    """main(argv) in a forked child that sends itself ``kill`` right after its n-th file-system call;
    (exit code or -signal, stderr, whether the signal was sent)."""
    stderr, calls_file = os.path.join(WORK, "stderr.txt"), os.path.join(WORK, "calls.txt")
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        calls = [0]

        def counted(function):
            def call(*args, **kwargs):
                result = function(*args, **kwargs)
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), kill)
                return result
            return call

        for name in FS_CALLS:
            setattr(os, name, counted(getattr(os, name)))
        for name in ("write_png", "write_exr", "write_json"):
            setattr(images, name, counted(getattr(images, name)))
        if hasattr(files, "_exchange"):
            files._exchange = counted(files._exchange if config["exchange"] else lambda a, b: False)
        try:
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
            code = 99
        with open(calls_file, "w") as f:
            f.write(str(calls[0]))
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    sent = code < 0 or (kill is not None and int(open(calls_file).read()) >= n)
    if os.path.exists(calls_file):
        os.remove(calls_file)
    return code, open(stderr).read(), sent


def state():
    files_in = None
    if os.path.isdir(OUT):
        files_in = {}
        for name in os.listdir(OUT):
            with open(os.path.join(OUT, name), "rb") as f:
                files_in[name] = hashlib.sha256(f.read()).hexdigest()
    return {"out": files_in, "space": sorted(os.listdir(SPACE))}


def fresh_old_set():
    shutil.rmtree(SPACE, ignore_errors=True)
    os.makedirs(SPACE)
    assert run(command(config["old"], OUT, False))[0] == 0
    with open(os.path.join(OUT, "notes.txt"), "w") as f:
        f.write("the user's own file")


records = []
for kill in config["signals"]:
    n = 1
    while True:
        fresh_old_set()
        code, stderr, sent = run(command(config["new"], OUT, True), getattr(signal, kill), n)
        if not sent:
            break
        after_kill = state()
        next_code, next_stderr, _ = run(command(config["new"], OUT, False))
        records.append({"signal": kill, "n": n, "code": code, "stderr": stderr, "after_kill": after_kill,
                        "next_code": next_code, "next_stderr": next_stderr, "after_next": state()})
        n += 1
fresh_old_set()
old = state()["out"]
shutil.rmtree(OUT)
assert run(command(config["new"], OUT, False))[0] == 0
with open(os.path.join(OUT, "notes.txt"), "w") as f:
    f.write("the user's own file")
print(json.dumps({"records": records, "old": old, "new": state()["out"]}))
'''


def _panoramas(tmp_path):
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"panorama{seed}.png"
        pixels = np.random.default_rng(seed).random((32, 64, 3))
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _which_set(files_in, old, new):
    """"old" or "new" when ``files_in`` (name -> content key, notes.txt aside) is that complete set, "missing"
    when there is no folder, else "mixed"."""
    if files_in is None:
        return "missing"
    files_in = {name: key for name, key in files_in.items() if name != "notes.txt"}
    for name, reference in (("old", old), ("new", new)):
        if files_in == {key: value for key, value in reference.items() if key != "notes.txt"}:
            return name
    return "mixed"


@pytest.mark.parametrize("command,exchange", [("cubemap", True), ("hdr", True), ("cubemap", False)],
                         ids=["cubemap", "hdr", "cubemap-without-exchange"])
def test_a_set_killed_at_any_step_of_writing_is_old_or_new_never_mixed(tmp_path, command, exchange):
    old_panorama, new_panorama = _panoramas(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    signals = ["SIGKILL", "SIGTERM", "SIGINT"] if exchange else ["SIGKILL"]
    config = {"work": str(work), "command": command, "old": old_panorama, "new": new_panorama,
              "exchange": exchange, "signals": signals}
    result = run_python(KILL_DRIVER, json.dumps(config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    old, new = report["old"], report["new"]
    out = str(work / "space" / "out")
    outcomes = {kill: set() for kill in signals}
    for record in report["records"]:
        where = f"{record['signal']} after file-system call {record['n']}: {record}"
        seen = _which_set(record["after_kill"]["out"], old, new)
        outcomes[record["signal"]].add(seen)
        if record["signal"] == "SIGKILL":
            assert record["code"] == -signal.SIGKILL, where
            # Between the two renames of a swap without an exchange the folder is briefly missing (never mixed).
            assert seen in (("old", "new") if exchange else ("old", "new", "missing")), where
        else:
            assert record["code"] == 130 and seen in ("old", "new"), where
            said = ("Interrupted; nothing was written." if seen == "old" else
                    f"Interrupted after the new files were in place; {out} holds the complete new set.")
            assert last_error_line(record["stderr"]) == f"error: {said}", where
            assert record["after_kill"]["space"] == ["out"] and "notes.txt" in record["after_kill"]["out"], where
        # The next run into the folder (refused: no --overwrite) repairs it: a complete set, the user's file,
        # nothing hidden.
        assert record["next_code"] == 2 and "already exists" in record["next_stderr"], where
        after = _which_set(record["after_next"]["out"], old, new)
        assert after == ("old" if seen == "missing" else seen), where
        assert record["after_next"]["space"] == ["out"] and "notes.txt" in record["after_next"]["out"], where
    for kill, seen in outcomes.items():  # the kills spanned the whole writing, before and after the swap
        assert {"old", "new"} <= seen, (kill, seen)
    assert len(report["records"]) >= len(signals) * 10


KILL_AT_FIRST_RENAME = """
import os, signal, sys
space, kill = sys.argv[1], getattr(signal, sys.argv[2])
calls = []
for name in ("rename", "replace"):
    def call(source, destination, *args, _real=getattr(os, name), **kwargs):
        _real(source, destination, *args, **kwargs)
        if str(source).startswith(space) and not calls:
            calls.append(source)
            os.kill(os.getpid(), kill)
    setattr(os, name, call)
from backend.app.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_generate_jobs_killed_at_their_first_rename_are_old_or_new_never_mixed(tiny_model, tmp_path):
    """The real path, one job per signal, each into the folder the one before left: a run also repairs what
    the run before it left (the SIGKILL's hidden folder) before it writes."""
    space = tmp_path / "space"
    out = space / "out"
    assert run_python(CLI, *generate_args(tiny_model, out, "--seed", "1")).returncode == 0
    (out / "notes.txt").write_text("the user's own file")
    for seed, signal_name in ((2, "SIGKILL"), (3, "SIGTERM"), (4, "SIGINT")):
        old = {name: key for name, key in digests(out).items() if name != "notes.txt"}
        args = generate_args(tiny_model, out, "--seed", str(seed), "--overwrite")
        result = run_python(KILL_AT_FIRST_RENAME, space, signal_name, *args)
        after_kill = {name: key for name, key in (digests(out) or {}).items() if name != "notes.txt"}
        kept = {name for name in after_kill if after_kill[name] == old.get(name)}
        seen = "old" if kept == set(old) else "new" if not kept else "mixed"
        assert seen in ("old", "new") and set(after_kill) == set(old), (signal_name, seen, result.stderr)
        if seen == "new":
            assert json.loads((out / "metadata.json").read_text())["seed"] == seed
        if signal_name == "SIGKILL":
            assert result.returncode == -signal.SIGKILL
            continue
        said = ("Interrupted; nothing was written." if seen == "old" else
                f"Interrupted after the new files were in place; {out} holds the complete new set.")
        assert result.returncode == 130 and last_error_line(result.stderr) == f"error: {said}", result.stderr
        assert os.listdir(space) == ["out"] and (out / "notes.txt").exists()  # the SIGKILL's leftovers too

    # Any later run into the folder repairs what a SIGKILL left, even one that is refused.
    again = run_python(CLI, *generate_args(tiny_model, out, "--seed", "5"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert os.listdir(space) == ["out"] and (out / "notes.txt").read_text() == "the user's own file"


# ---------------------------------------------------------------- 10. one run per output folder


def test_a_second_run_into_a_busy_folder_is_refused_at_once(tiny_model, tmp_path):
    space = tmp_path / "space"
    out = space / "out"
    log = open(tmp_path / "first.err", "w")  # a file, not a pipe nobody reads, which could fill and block the run
    args = generate_args(tiny_model, out, "--json-progress", "--seed", "1")
    first = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE, stderr=log, text=True,
                             env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    try:
        for line in first.stdout:  # the first run is denoising: it holds the folder; freeze it there
            if json.loads(line).get("stage") == "denoising":
                first.send_signal(signal.SIGSTOP)
                break
        else:
            pytest.fail("the first run ended before denoising")
        second = run_python(CLI, *generate_args(tiny_model, out, "--json-progress", "--seed", "2"))
    finally:
        first.send_signal(signal.SIGCONT)
    rest = first.stdout.read()
    assert first.wait(timeout=TIMEOUT) == 0, (tmp_path / "first.err").read_text()
    log.close()
    sentence = (f"The output folder {out} is in use by another SyncSphere run (pid {first.pid}); wait for it or "
                "choose another --out.")
    assert second.returncode == 2 and last_error_line(second.stderr) == f"error: {sentence}"
    assert events_of(second.stdout) == [{"event": "error", "job": None, "kind": "bad_request", "message": sentence}]
    assert events_of(rest)[-1]["event"] == "done"
    assert json.loads((out / "metadata.json").read_text())["seed"] == 1
    assert os.listdir(space) == ["out"]  # the lock file went with the run


@pytest.mark.parametrize("command", ["cubemap", "hdr", "view"])
def test_file_commands_lock_their_output_too(tmp_path, command):
    from backend.products.files import output_lock

    panorama = _panoramas(tmp_path)[0]
    out = tmp_path / "space" / ("view.png" if command == "view" else "out")
    extra = ["--yaw", "0", "--pitch", "0", "--fov", "90", "--size", "8"] if command == "view" else []
    kind = "file" if command == "view" else "folder"
    with output_lock(str(out), kind):
        busy = run_python(CLI, command, panorama, "--out", out, *extra)
    assert busy.returncode == 2 and last_error_line(busy.stderr) == (
        f"error: The output {kind} {out} is in use by another SyncSphere run (pid {os.getpid()}); wait for it or "
        "choose another --out.")
    assert not (tmp_path / "space").exists()  # the lock's folder was made for it and removed again
    done = run_python(CLI, command, panorama, "--out", out, *extra)
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "space") == [out.name]


def test_recovery_never_deletes_or_replaces_a_users_file(tmp_path):
    from backend.products.files import output_lock, recover_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "panorama.png").write_text("new")
    (out / "notes.txt").write_text("made after the crash")
    old = tmp_path / ".out.syncsphere-old-123"  # what a killed swap left: the old set and the user's files
    old.mkdir()
    (old / "panorama.png").write_text("old")
    (old / "notes.txt").write_text("the user's older notes")
    (old / "todo.txt").write_text("the user's list")
    with output_lock(str(out)):  # recovers; the lock file recorded no set: nothing of the old folder is deleted
        pass
    assert sorted(os.listdir(out)) == ["notes.txt", "panorama.png", "todo.txt"]
    assert (out / "panorama.png").read_text() == "new" and (out / "notes.txt").read_text() == "made after the crash"
    assert sorted(os.listdir(old)) == ["notes.txt", "panorama.png"]  # kept: a name in out already has them
    recover_output_folder(str(out), ["panorama.png"])  # with the set known, the old set's file goes
    assert os.listdir(old) == ["notes.txt"]
