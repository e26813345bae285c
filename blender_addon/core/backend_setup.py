"""Set up the backend's own Python: a virtual environment with the backend's requirements installed.

Plain Python on purpose (no bpy, no torch), so it is tested without Blender. Used by the "Set Up
Backend" operator of the preferences (``operators/setup.py``), which starts it only when Blender's
``bpy.app.online_access`` allows downloads (docs/conventions.md#blender-rules); otherwise it shows
``offline_explanation()``.

A ``BackendSetup`` runs, in a background thread:

    <base python> -m venv <folder>
    <folder's python> -m pip install -r <requirements> [extra pip arguments]

reads pip's output line by line into a log file and into progress attributes a modal operator can
poll (``stage``, ``collected``, ``to_install``, ``last_line``, ``fraction``, ``status_text()``), can be
cancelled (the running process and its children are killed), and ends in one of three states:

    'done'       ``python`` is the environment's interpreter, the folder holds the ready marker
    'error'      ``error`` is one readable sentence that names the log file
    'cancelled'  the user stopped it

The ready marker (``READY_MARKER``) is written only after pip succeeded, so a half-made environment is
never taken for a working one; on failure or cancel a folder this run created is removed again.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from .backend_command import EXTENSION_DIR

# The backend's requirements, shipped inside the extension (the folder that holds blender_manifest.toml).
REQUIREMENTS_FILE = os.path.join(EXTENSION_DIR, "requirements.txt")

# Written into the environment's folder after a successful install, and only then.
READY_MARKER = ".syncsphere-ready"

# Stages of a run, in order.
STAGE_VENV = "creating environment"
STAGE_PIP = "installing"

# Rough share of the whole run each part takes, for ``fraction``: creating the environment is quick,
# collecting (resolving and downloading) is most of the time, pip installs without per-package output.
_VENV_SHARE = 0.1
_COLLECT_SHARE = 0.75

# Seconds to retry removing a folder whose files a just-killed process may still hold (Windows).
_REMOVE_RETRY_S = 5.0


def venv_python(folder, windows=None):
    """Return the path of the interpreter inside the virtual environment ``folder``.

    Takes the environment's folder and whether to use the Windows layout (default: this platform's).
    Returns ``<folder>/Scripts/python.exe`` on Windows, ``<folder>/bin/python`` elsewhere.
    """
    if windows is None:
        windows = os.name == "nt"
    if windows:
        return os.path.join(folder, "Scripts", "python.exe")
    return os.path.join(folder, "bin", "python")


def _is_interpreter(path):
    """True when ``path`` is an executable file."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _looks_like_python(path):
    """True when the file name of ``path`` is a Python interpreter's (python, python3.11, python.exe)."""
    name = os.path.basename(path).lower()
    return name.startswith("python") and "-config" not in name


def find_base_python(prefix, executable, version=None):
    """Find the Python interpreter to create the backend's virtual environment with.

    Takes ``prefix`` and ``executable`` (pass ``sys.prefix`` and ``sys.executable``) and the
    ``(major, minor)`` version to prefer (default: this interpreter's). Returns the path of an
    executable interpreter, or None when there is none.

    Inside Blender, ``sys.prefix`` is Blender's bundled Python (``<version>/python``), whose
    interpreter is ``bin/python3.11`` on Linux and macOS and ``bin/python.exe`` on Windows; with the
    ``bpy`` module ``sys.prefix`` is the environment running it. Both are tried before ``executable``,
    which may be the Blender binary itself (older Blender versions, some builds): running that with
    ``-m venv`` would start Blender, so ``executable`` is used only when its name is a Python's.
    """
    major, minor = version or sys.version_info[:2]
    bin_dir = os.path.join(prefix, "bin")
    candidates = []
    # The exact version first: it matches the standard library Blender runs with.
    for name in (f"python{major}.{minor}", f"python{major}"):
        candidates += [os.path.join(bin_dir, name), os.path.join(bin_dir, name + ".exe")]
    # Then any other python3.x in bin/ (sorted, so the choice does not depend on the file system).
    candidates += sorted(path for path in glob.glob(os.path.join(bin_dir, "python3*"))
                         if _looks_like_python(path))
    candidates += [
        os.path.join(bin_dir, "python.exe"),  # Blender on Windows: <version>\python\bin\python.exe
        os.path.join(prefix, "python.exe"),  # a standard Windows Python installation
        os.path.join(bin_dir, "python"),
    ]
    if executable and _looks_like_python(executable):
        candidates.append(executable)
    for candidate in candidates:
        if _is_interpreter(candidate):
            return candidate
    return None


def offline_explanation(extension_dir=EXTENSION_DIR):
    """Return the sentence shown when Blender's online access is off and nothing may be downloaded.

    Takes the extension's folder (whose requirements.txt lists the backend's packages). Returns one
    sentence saying how to allow online access, or how to use an existing Python instead.
    """
    requirements = os.path.join(extension_dir, "requirements.txt")
    return ("Setting up the backend downloads its Python packages, but Blender's online access is off: "
            "allow it in Preferences > System > Network > Allow Online Access, or set \"Backend Python\" "
            "in SyncSphere's preferences to an existing Python where you have run "
            f"'pip install -r \"{requirements}\"'")


def is_ready(folder):
    """Return True when ``folder`` holds an environment a ``BackendSetup`` finished successfully.

    Takes the environment's folder. Returns whether its ready marker and its interpreter both exist.
    """
    return os.path.isfile(os.path.join(folder, READY_MARKER)) and os.path.isfile(venv_python(folder))


def count_requirements(requirements):
    """Return how many requirement lines ``requirements`` has (comments, blanks and options skipped).

    Takes the path of a requirements file; returns 0 when it cannot be read. Only an estimate for
    progress: pip also collects every requirement's dependencies.
    """
    try:
        with open(requirements, encoding="utf-8") as file:
            lines = [line.split("#", 1)[0].strip() for line in file]
    except OSError:
        return 0
    return sum(1 for line in lines if line and not line.startswith("-"))


def setup_environment(base_env=None):
    """Return the environment variables for the venv and pip processes, as a new dict.

    Takes the environment to start from (default: this process's; it is copied, never modified).
    """
    env = dict(os.environ if base_env is None else base_env)
    # Blender's PYTHONHOME / PYTHONPATH would point another interpreter at the wrong standard library
    # and at Blender's own modules.
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    env["PYTHONNOUSERSITE"] = "1"  # packages in the user's site folder must not count as installed
    env["PYTHONUNBUFFERED"] = "1"  # progress lines as they happen, not when a buffer fills
    env["PYTHONIOENCODING"] = "utf-8"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # one network request less, and no upgrade nag in the log
    env["PIP_NO_INPUT"] = "1"  # never wait for a password prompt nobody can see
    return env


class _Failed(Exception):
    """The run failed; ``str()`` is the readable sentence (without the log's location)."""


class _Cancelled(Exception):
    """The run was cancelled."""


class BackendSetup:
    """Create a virtual environment and install the backend's requirements into it, in a thread.

    base_python: the interpreter that creates the environment (see ``find_base_python``).
    folder: the environment's folder; it may exist if it is empty or already a virtual environment.
    requirements: the requirements file pip installs (``REQUIREMENTS_FILE`` by default).
    extra_args: more arguments for ``pip install`` (an index URL, ``--no-index``, ...).
    log_path: file that receives the full output of both commands (default: ``<folder>-setup.log``,
        next to the folder, because a failed run removes the folder).
    env: the environment to start the processes from (see ``setup_environment``).

    Attributes read while it runs: ``state`` ('idle', 'running', 'done', 'error', 'cancelled'),
    ``stage`` (``STAGE_VENV`` or ``STAGE_PIP``), ``stages`` (every stage entered, in order),
    ``collected`` (packages pip has collected so far), ``to_install`` (packages pip is installing,
    0 until it starts), ``installed`` (names pip reported installed), ``last_line`` (pip's last
    output line). After it ends: ``python`` on success, ``error`` otherwise.
    """

    def __init__(self, base_python, folder, requirements=REQUIREMENTS_FILE, extra_args=(), *,
                 log_path=None, env=None):
        self.base_python = os.fspath(base_python)
        self.folder = os.path.abspath(os.fspath(folder))
        self.requirements = os.path.abspath(os.fspath(requirements))
        self.extra_args = [os.fspath(arg) for arg in extra_args]
        self.log_path = os.fspath(log_path) if log_path else self.folder.rstrip("/\\") + "-setup.log"
        self.env = setup_environment(env)
        self.state = "idle"
        self.stage = ""
        self.stages = []
        self.collected = 0
        self.to_install = 0
        self.installed = []
        self.last_line = ""
        self.python = None
        self.error = None
        self._expected = max(1, count_requirements(self.requirements))
        self._lock = threading.Lock()  # guards _process and _cancelled between the thread and cancel()
        self._process = None
        self._cancelled = False
        self._created_folder = False
        self._thread = None
        self._log = None

    # --- the caller's side ------------------------------------------------------------------------

    def start(self):
        """Start the run in a background thread; returns immediately. A second call does nothing."""
        if self._thread is not None:
            return
        self.state = "running"
        # A daemon thread: a Blender that quits mid-install must not wait for pip.
        self._thread = threading.Thread(target=self._run, name="syncsphere-backend-setup", daemon=True)
        self._thread.start()

    def cancel(self):
        """Stop the run: kill the running command (and its children); the thread then cleans up.

        Returns immediately; ``wait()`` or ``finished`` tell when the run has ended.
        """
        with self._lock:
            self._cancelled = True
            process = self._process
        if process is not None:
            _kill_tree(process)

    @property
    def finished(self):
        """True once the run has ended, whichever way."""
        return self.state in ("done", "error", "cancelled")

    def wait(self, timeout=None):
        """Wait for the run to end; takes a timeout in seconds (None: forever). Returns ``finished``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    @property
    def fraction(self):
        """A rough, never decreasing estimate of how much of the run is done, from 0.0 to 1.0.

        pip does not know in advance how many packages it will collect, so the collecting part grows
        as collected / (collected + requirement lines) and never quite reaches its end.
        """
        if self.state == "done":
            return 1.0
        if self.stage != STAGE_PIP:
            return 0.0
        if self.to_install:
            return _VENV_SHARE + _COLLECT_SHARE
        collected = self.collected
        return _VENV_SHARE + _COLLECT_SHARE * collected / (collected + self._expected)

    def status_text(self):
        """Return one line describing where the run is, for a status bar or a panel."""
        if self.state == "done":
            return f"Backend environment ready: {self.python}"
        if self.state == "error":
            return self.error
        if self.state == "cancelled":
            return "Backend setup cancelled"
        if self.stage == STAGE_VENV:
            return "Setting up the backend: creating the Python environment"
        if self.stage == STAGE_PIP:
            if self.to_install:
                what = f"installing {_packages(self.to_install)}"
            else:
                what = f"{_packages(self.collected)} collected"
            detail = f" ({self.last_line})" if self.last_line else ""
            return f"Setting up the backend: {what}{detail}"
        return "Setting up the backend"

    # --- the thread's side -----------------------------------------------------------------------

    def _run(self):
        """The thread: run both commands, then set the final state (never raises)."""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        except OSError as exc:
            self.error = f"Could not write the backend setup log {self.log_path!r}: {exc}"
            self.state = "error"
            return
        try:
            self._check_folder()
            self._enter(STAGE_VENV)
            self._command([self.base_python, "-m", "venv", self.folder], self._venv_failure)
            python = venv_python(self.folder)
            if not os.path.isfile(python):
                raise _Failed(f"Creating the virtual environment did not make {python!r}")
            self._enter(STAGE_PIP)
            self._command([python, "-m", "pip", "install", "--progress-bar", "off",
                           "-r", self.requirements, *self.extra_args], self._pip_failure)
            self._mark_ready(python)
        except _Cancelled:
            self._log_line("--- cancelled")
            self._clean_up()
            self.state = "cancelled"
        except _Failed as failure:
            self._log_line(f"--- failed: {failure}")
            self._clean_up()
            self.error = f"{failure}; the full output is in {self.log_path}"
            self.state = "error"
        except Exception as exc:  # noqa: BLE001 -- the thread must always end in a readable state
            self._log_line(f"--- unexpected error: {exc!r}")
            self._clean_up()
            self.error = f"Setting up the backend failed unexpectedly ({exc}); the full output is in {self.log_path}"
            self.state = "error"
        else:
            self._log_line(f"--- ready: {python}")
            self.python = python
            self.state = "done"
        finally:
            self._log.close()

    def _check_folder(self):
        """Decide whether this run owns the folder (may remove it) and refuse a folder that is not ours.

        An existing empty folder counts as created by this run (Blender's extension_path_user creates
        the folder it returns). An existing virtual environment is reused: pip brings it up to date,
        and it is left in place if that fails, but without the ready marker.
        """
        if not os.path.exists(self.folder):
            self._created_folder = True
            return
        if not os.path.isdir(self.folder):
            raise _Failed(f"{self.folder!r} exists and is not a folder")
        if not os.listdir(self.folder):
            self._created_folder = True
            return
        if not os.path.isfile(os.path.join(self.folder, "pyvenv.cfg")):
            raise _Failed(f"The folder {self.folder!r} is not empty and is not a virtual environment; "
                          "remove it or choose another one")
        # Not ready again until this run succeeds.
        marker = os.path.join(self.folder, READY_MARKER)
        if os.path.exists(marker):
            os.remove(marker)

    def _enter(self, stage):
        """Record that the run has reached ``stage``."""
        self.stage = stage
        self.stages.append(stage)
        self.last_line = ""
        self._log_line(f"--- {stage}")

    def _command(self, argv, failure):
        """Run ``argv``, feeding its output to the log and the parser; raise on cancel or failure.

        ``failure(returncode)`` returns the sentence for a non-zero exit status.
        """
        self._log_line("$ " + subprocess.list2cmdline(argv))
        kwargs = {}
        if os.name == "nt":
            # Its own process group so it can be killed with its children, and no console window
            # popping up over Blender.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            # Its own session (and process group): pip runs build backends in child processes, and
            # cancel must kill them too, or they would keep the output pipe open and the folder busy.
            kwargs["start_new_session"] = True
        with self._lock:
            if self._cancelled:
                raise _Cancelled()
            try:
                process = subprocess.Popen(
                    argv,
                    env=self.env,
                    # pip resolves relative paths in a requirements file against the working folder.
                    cwd=os.path.dirname(self.requirements),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    bufsize=1,
                    **kwargs,
                )
            except OSError as exc:
                raise _Failed(f"Could not start {argv[0]!r}: {exc}") from exc
            self._process = process
        lines = []
        try:
            for line in process.stdout:
                line = line.rstrip()
                self._log_line(line)
                if line:
                    lines.append(line)
                    del lines[:-50]  # enough to find pip's error lines
                    self._parse(line)
            returncode = process.wait()
        finally:
            process.stdout.close()
            with self._lock:
                self._process = None
        if self._cancelled:
            raise _Cancelled()
        if returncode != 0:
            raise _Failed(failure(returncode, lines))

    def _venv_failure(self, returncode, lines):
        """The sentence for a failed ``python -m venv`` (e.g. a system Python without ensurepip)."""
        detail = lines[-1] if lines else f"exit status {returncode}"
        return f"Creating the virtual environment {self.folder!r} with {self.base_python!r} failed ({detail})"

    def _pip_failure(self, returncode, lines):
        """The sentence for a failed ``pip install``: pip's last ERROR line says what went wrong."""
        errors = [line for line in lines if line.startswith("ERROR:")]
        if errors:
            detail = errors[-1][len("ERROR:"):].strip()
        else:
            detail = lines[-1] if lines else f"exit status {returncode}"
        return f"Installing the backend's packages failed ({detail.rstrip('.')})"

    def _parse(self, line):
        """Update the progress attributes from one line of pip's output."""
        self.last_line = line.strip()[:200]
        if line.startswith(("Collecting ", "Processing ", "Requirement already satisfied: ")):
            self.collected += 1
        elif line.startswith("Installing collected packages:"):
            names = line.partition(":")[2]
            self.to_install = len([name for name in names.split(",") if name.strip()])
        elif line.startswith("Successfully installed "):
            self.installed = line[len("Successfully installed "):].split()

    def _mark_ready(self, python):
        """Write the ready marker: what was installed with what, for a later check or a bug report."""
        with open(self.requirements, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
        info = {
            "python": python,
            "base_python": self.base_python,
            "requirements": self.requirements,
            "requirements_sha256": digest,
            "extra_args": self.extra_args,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Atomically: a marker that exists is complete.
        marker = os.path.join(self.folder, READY_MARKER)
        with open(marker + ".tmp", "w", encoding="utf-8") as file:
            json.dump(info, file, indent=2)
        os.replace(marker + ".tmp", marker)

    def _clean_up(self):
        """Remove the folder after a failure or cancel, if this run created it."""
        if not self._created_folder or not os.path.exists(self.folder):
            return
        deadline = time.monotonic() + _REMOVE_RETRY_S
        while True:
            try:
                shutil.rmtree(self.folder)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # A process killed a moment ago may still hold a file open (Windows).
                if time.monotonic() > deadline:
                    self._log_line(f"--- could not remove {self.folder}: {exc}")
                    return
                time.sleep(0.2)

    def _log_line(self, line):
        """Append one line to the log file."""
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()


def _packages(count):
    """Return "1 package" or "<count> packages"."""
    return f"{count} package" if count == 1 else f"{count} packages"


def _kill_tree(process):
    """Kill ``process`` and the processes it started (it runs in its own process group)."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        # taskkill /T ends the whole tree; fall back to the process alone.
        result = subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                                capture_output=True, creationflags=subprocess.CREATE_NO_WINDOW)
        if result.returncode != 0:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
