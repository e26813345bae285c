"""How the add-on starts the backend process: command lines and environment.

Plain Python on purpose (no bpy import, no torch import), so it can be tested in any interpreter.
The add-on runs the backend in a separate interpreter that has torch installed (docs/conventions.md#extension):

    <python> -m backend serve --stdio        the long-lived worker Blender talks to
    <python> -m backend info                 a one-shot check of that interpreter

with the extension folder (the folder that contains ``backend/``) as the only ``PYTHONPATH`` entry.
"""

import os
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
    try:
        result = subprocess.run(
            command,
            env=env,
            # `python -m` puts the working directory first on sys.path: run in the extension folder
            # so a `backend` folder in Blender's working directory cannot shadow ours.
            cwd=os.fspath(extension_dir),
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
        return False, f"Could not start the backend Python interpreter {python!r}: {exc}"
    if result.returncode != 0:
        detail = _tail(result.stderr.strip() or result.stdout.strip()) or "no output"
        return False, f"'{shown}' failed with exit status {result.returncode}: {detail}"
    return True, _tail(result.stdout.strip())


def _tail(text):
    """Return at most the last ``_MAX_REPORT_CHARS`` characters of ``text``: errors come last."""
    if len(text) <= _MAX_REPORT_CHARS:
        return text
    return "..." + text[-_MAX_REPORT_CHARS:]
