"""How the add-on starts the backend process: command lines and environment.

Plain Python on purpose (no bpy import, no torch import), so it can be tested in any interpreter.
The add-on runs the backend in a separate interpreter that has torch installed (docs/conventions.md#extension):

    <python> -m backend serve --stdio        the long-lived worker Blender talks to
    <python> -m backend info                 a one-shot check of that interpreter

with the extension folder (the folder that contains ``backend/``) as the only ``PYTHONPATH`` entry.

A backend on another machine (``RemoteBackend``) is started over SSH, the same protocol over the SSH channel,
authenticated by the user's own SSH keys; no port is opened on either side:

    ssh [options] HOST 'cd FOLDER && exec env PYTHONPATH=FOLDER ... PYTHON -m backend serve --stdio'
"""

import dataclasses
import os
import posixpath
import shlex
import subprocess

# The folder that holds blender_manifest.toml, __init__.py and backend/: blender_addon/core/ is two levels below.
EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds a one-shot backend command may take. `info` imports torch and may initialise CUDA, which
# takes several seconds on a cold start, but it must not hang Blender's UI forever.
DEFAULT_TIMEOUT_S = 120.0

# The most characters of a backend's output that are shown back to the user.
_MAX_REPORT_CHARS = 2000


def backend_command(python, *args):
    """Return the command line that runs ``python -m backend <args>``.

    ``args`` default to ``("serve", "--stdio")``, the worker the add-on keeps running.
    """
    if not args:
        args = ("serve", "--stdio")
    return [python, "-m", "backend", *args]


SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15",
               "-o", "ServerAliveCountMax=4")
"""What the add-on always asks of ssh: no terminal (the channel carries protocol lines only), never a password
prompt (Blender has no terminal to type it in: keys or an agent only), and a connection that stops answering
found out within about a minute."""


SSH_NEEDS_ONLINE_ACCESS = ("Backend = SSH connects to another machine: turn on Allow Online Access in Blender's "
                           "Preferences > System > Network, or set Backend to Local")
"""Why an SSH backend is not used while Blender's online access is off (docs/conventions.md#blender-rules)."""


@dataclasses.dataclass(frozen=True)
class RemoteBackend:
    """A backend on another machine, reached with ``ssh`` (the preferences' Backend = SSH).

    host: what ``ssh`` connects to (``user@gpu-box`` or a ``Host`` of ~/.ssh/config); python: the Python there
    that has torch and diffusers (``~/`` allowed); folder: the SyncSphere folder there (the one holding
    ``backend/``: a clone or the unzipped extension); output_dir: the absolute folder there that jobs write into
    before their files come back; cache_dir: the model cache there (``HF_HOME``; empty: that machine's default);
    ssh_options: more ssh arguments, as typed on a command line (``-p 2222 -i ~/.ssh/gpu``); ssh: the ssh
    program.
    """

    host: str
    python: str
    folder: str
    output_dir: str
    cache_dir: str = ""
    ssh_options: str = ""
    ssh: str = "ssh"

    def problem(self):
        """Why this remote backend cannot be used as set, in one sentence, or None."""
        if not self.host.strip():
            return "No SSH host is set: type the GPU machine's name (user@host) in the SyncSphere preferences"
        for label, path in (("Remote Python", self.python), ("Remote SyncSphere Folder", self.folder)):
            if not path.strip():
                return f"No {label} is set: type its path on {self.host} in the SyncSphere preferences"
        if not posixpath.isabs(self.output_dir.strip()):
            return (f"The Remote Output Folder must be an absolute path on {self.host} (like /home/me/syncsphere-outputs), "
                    f"not {self.output_dir.strip()!r}")
        try:
            shlex.split(self.ssh_options)
        except ValueError as error:
            return f"The SSH options cannot be read ({error}); type them as on a command line"
        return None

    def command(self, *args, allow_network=True):
        """The argv that runs ``python -m backend <args>`` on the host over ssh (``args`` default to ``serve
        --stdio``), in the remote SyncSphere folder with the environment ``backend_environment`` gives a local
        one: that folder the only PYTHONPATH entry, UTF-8, unbuffered, the model cache, and offline unless
        ``allow_network``."""
        folder = _remote_path(self.folder.strip())
        variables = [f"PYTHONPATH={folder}", "PYTHONIOENCODING=utf-8", "PYTHONUNBUFFERED=1"]
        if self.cache_dir.strip():
            variables.append(f"HF_HOME={_remote_path(self.cache_dir.strip())}")
        if not allow_network:
            variables.append("HF_HUB_OFFLINE=1")
        backend = [_remote_path(self.python.strip()), "-m", "backend", *(args or ("serve", "--stdio"))]
        remote = f"cd {folder} && exec env {' '.join(variables)} {' '.join(backend[:1] + [shlex.quote(a) for a in backend[1:]])}"
        return [self.ssh, *SSH_OPTIONS, *shlex.split(self.ssh_options), "--", self.host.strip(), remote]

    def job_folder(self, local_job_folder):
        """The folder on the host a job writes into: the local job folder's name in the Remote Output Folder."""
        return posixpath.join(self.output_dir.strip(), os.path.basename(os.path.normpath(local_job_folder)))


def _remote_path(path):
    """``path`` quoted for the remote shell; a leading ``~/`` becomes the home folder there (``"$HOME"/``)."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:]) if path[2:] else '"$HOME"'
    return shlex.quote(path)


def backend_environment(extension_dir=EXTENSION_DIR, *, base_env=None, allow_network=True):
    """Return the environment for a backend process as a new dict.

    ``base_env`` defaults to this process's environment; it is copied, never modified.
    ``allow_network=False`` (Blender's "Allow Online Access" is off) keeps the backend from
    downloading models: Hugging Face libraries then use only their local cache.
    """
    env = dict(os.environ if base_env is None else base_env)
    # The extension folder is the only PYTHONPATH entry: `-m backend` must find our package, and
    # whatever Blender's own process had on PYTHONPATH (its bundled modules, another add-on's
    # folders) must not leak into an interpreter with a different Python version.
    env["PYTHONPATH"] = os.fspath(extension_dir)
    # A PYTHONHOME inherited from Blender's process would point the backend interpreter at the
    # wrong standard library.
    env.pop("PYTHONHOME", None)
    # The protocol is UTF-8 JSON lines; pipes default to the locale encoding on Windows.
    env["PYTHONIOENCODING"] = "utf-8"
    # Log lines on stderr should reach the add-on's log file as they happen, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    if not allow_network:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def interpreter_error(python):
    """Return a readable sentence saying why ``python`` cannot be used, or None if it looks usable.

    This checks only that the path names an executable file; whether torch and the backend import
    there is what ``run_backend`` with ``info`` finds out.
    """
    if not python or not python.strip():
        return ("No backend Python interpreter is set: choose one (a Python with torch and "
                "diffusers installed) in the SyncSphere add-on preferences")
    if not os.path.isfile(python):
        return f"The backend Python interpreter {python!r} does not exist"
    if not os.access(python, os.X_OK):
        return f"The backend Python interpreter {python!r} is not executable"
    return None


def run_backend(python, *args, extension_dir=EXTENSION_DIR, allow_network=True,
                timeout=DEFAULT_TIMEOUT_S):
    """Run a one-shot ``python -m backend <args>`` and return ``(ok, text)``.

    ``ok`` is True when the command exited with status 0; ``text`` is then its stdout, otherwise a
    readable explanation including the end of its stderr. Never raises for a failing backend.
    """
    error = interpreter_error(python)
    if error is not None:
        return False, error
    command = backend_command(python, *args)
    shown = " ".join(["python", *command[1:]])  # The interpreter's path is in the preferences.
    env = backend_environment(extension_dir, allow_network=allow_network)
    return _run_command(command, shown, env, extension_dir, timeout, f"the backend Python interpreter {python!r}")


def run_remote_backend(remote, *args, allow_network=True, timeout=DEFAULT_TIMEOUT_S):
    """Run a one-shot ``python -m backend <args>`` on the ``RemoteBackend``'s host over ssh and return ``(ok,
    text)`` as ``run_backend`` does (Check Backend with Backend = SSH). Never raises for a failing backend or
    connection: ssh's own complaint (a refused key, an unknown host) is in ``text``."""
    error = remote.problem()
    if error is not None:
        return False, error
    shown = f"ssh {remote.host.strip()} python -m backend {' '.join(args)}"
    return _run_command(remote.command(*args, allow_network=allow_network), shown, None, EXTENSION_DIR, timeout,
                        f"ssh ({remote.ssh})")


def _run_command(command, shown, env, cwd, timeout, program):
    """Run ``command`` to its end; ``(ok, text)`` as ``run_backend`` returns (``shown`` names it in messages,
    ``program`` names what could not be started)."""
    try:
        result = subprocess.run(
            command,
            env=env,
            # `python -m` puts the working directory first on sys.path: run in the extension folder
            # so a `backend` folder in Blender's working directory cannot shadow ours.
            cwd=os.fspath(cwd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"'{shown}' did not finish within {timeout:g} seconds"
    except OSError as exc:
        return False, f"Could not start {program}: {exc}"
    if result.returncode != 0:
        detail = _tail(result.stderr.strip() or result.stdout.strip()) or "no output"
        return False, f"'{shown}' failed with exit status {result.returncode}: {detail}"
    return True, _tail(result.stdout.strip())


def _tail(text):
    """Return at most the last ``_MAX_REPORT_CHARS`` characters of ``text``: errors come last."""
    if len(text) <= _MAX_REPORT_CHARS:
        return text
    return "..." + text[-_MAX_REPORT_CHARS:]
