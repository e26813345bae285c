"""The preferences' Models list and the panel's model menu, as plain Python (no bpy), tested without Blender.

Everything goes through the backend's model manager (``python -m backend models``, backend/app/models_cli.py),
run with the configured backend Python:

    models list --json [--folder DIR]...      the installed models, as a JSON array (``list_installed``)
    models download ID [--fp16] --json-progress
                                              protocol ``progress`` events (stage ``downloading``, ``step`` and
                                              ``total`` in bytes), then ``done`` or ``error`` (``ModelDownload``)
    models remove ID                          deletes a hub model's cache entry (``remove_installed``); the
                                              backend refuses folders and files the user pointed at

Like ``worker_client``, the functions here take the command line, environment and working folder
(``backend_command.backend_command`` / ``backend_environment`` / ``EXTENSION_DIR``) rather than building them.

The last listing is kept in this module (``cached_models``) so that Blender's menu callback, which runs on
every redraw, reads it and never starts a process; ``refresh`` and ``refresh_in_background`` renew it. One
download runs at a time (``start_download`` / ``current_download``).
"""

import atexit
import collections
import dataclasses
import json
import os
import queue
import signal
import subprocess
import threading
import time

from ...backend import protocol
from ...backend.request import DEFAULT_MODEL  # the model Generate uses until the user picks another
from .panel_words import in_panel_words

# Seconds a listing or a removal may take. Listing imports huggingface_hub and scans the cache (well under
# a second usually); removing deletes gigabytes of files. Bounded, so a stuck interpreter never hangs Blender.
LIST_TIMEOUT_S = 60.0
REMOVE_TIMEOUT_S = 120.0

# How many of a download's last stderr lines are kept for the sentence of a process that died without one.
_STDERR_LINES = 20
# Internal event the stdout reader adds when the process's stdout ended.
_EXITED = "_exited"


# What each architecture (the backend's ``architecture`` of a listed model) is called in the list, its native view
# size in image pixels when the backend could not read it from the configs, and about how much GPU memory the
# backend's ``--memory auto`` needs for it in float16 (docs/engine.md, "Memory per family": SD 1.x/2.x whole on a
# 4 GB card; SDXL's 6.6 GiB of weights fit an 8 GB card with the models moved stage by stage).
ARCHITECTURES = {
    "SD1": ("SD 1.x", 512, "4 GB"),
    "SD2": ("SD 2.x", 512, "4 GB"),
    "SDXL": ("SDXL", 1024, "8 GB"),
    "SD3": ("SD3", 1024, "8 GB"),
}
DEFAULT_WINDOW_PX = 512
"""The view size of a model the list does not know (not installed, or typed): the backend's default model's."""


class ModelCommandError(Exception):
    """A model command failed; ``str()`` is one sentence for the user (the backend's own, when it gave one)."""


@dataclasses.dataclass
class InstalledModel:
    """One entry of ``models list --json`` (backend/engine/model_manager.py, ``InstalledModel``).

    id: the hub id, or the absolute path of a local folder or ``.safetensors`` file; kind: ``hub``,
    ``folder`` or ``single_file``; path: where it is on disk; size: bytes on disk; family: SD1, SD2, SDXL,
    LCM, Turbo or None (unknown); complete: every file the engine loads is there, else ``missing`` says what
    is not; variant: ``fp16`` for half-precision weights, else None; architecture: SD1, SD2, SDXL (SD3) or None,
    the backbone whatever the family (an SDXL Turbo is family Turbo, architecture SDXL); window_px: the native view
    size in image pixels the backend read from the configs, or None.
    """

    id: str
    kind: str
    path: str
    size: int
    family: str | None = None
    complete: bool = True
    missing: list[str] = dataclasses.field(default_factory=list)
    variant: str | None = None
    architecture: str | None = None
    window_px: int | None = None

    @classmethod
    def from_dict(cls, entry):
        """Build one from a dict of the backend's JSON list; raises ModelCommandError when a field is missing
        or has the wrong type."""
        try:
            return cls(str(entry["id"]), str(entry["kind"]), str(entry["path"]), int(entry["size"]),
                       entry.get("family"), bool(entry["complete"]), list(entry.get("missing") or ()),
                       entry.get("variant"), entry.get("architecture"),
                       None if entry.get("window_px") is None else int(entry["window_px"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelCommandError(
                f"The backend's model list has an entry SyncSphere cannot read ({error!r}).") from error

    @property
    def removable(self):
        """True for a Hugging Face cache entry. Folders and files the user pointed at are never deleted."""
        return self.kind == "hub"

    @property
    def label(self):
        """A short name: the hub id, or a local model's folder or file name."""
        return self.id if self.kind == "hub" else os.path.basename(os.path.normpath(self.path))

    @property
    def family_text(self):
        """The family as the list names it: the architecture's name (ARCHITECTURES: "SD 1.x", "SD 2.x", "SDXL"),
        followed by a few-step family ("SDXL Turbo", "SD 1.x LCM"); the backend's family when the architecture is
        not one of those; or "unknown family"."""
        name = ARCHITECTURES[self.architecture][0] if self.architecture in ARCHITECTURES else None
        if name is None:
            return self.family or "unknown family"
        return name if self.family in (None, self.architecture) else f"{name} {self.family}"

    @property
    def native_window_px(self):
        """The model's view size in image pixels: the backend's reading of its configs, else its architecture's
        (ARCHITECTURES), else DEFAULT_WINDOW_PX."""
        if self.window_px:
            return self.window_px
        return ARCHITECTURES[self.architecture][1] if self.architecture in ARCHITECTURES else DEFAULT_WINDOW_PX

    @property
    def needs_text(self):
        """What the model needs, e.g. "1024 px views, about 8 GB of GPU memory" (the memory left out when its
        architecture is unknown)."""
        memory = ARCHITECTURES[self.architecture][2] if self.architecture in ARCHITECTURES else None
        return f"{self.native_window_px} px views" + (f", about {memory} of GPU memory" if memory else "")

    @property
    def state_text(self):
        """"complete" (with "fp16" for half-precision weights), or "partial: missing ..." (what is missing)."""
        if not self.complete:
            return "partial: missing " + ", ".join(self.missing or ["files"])
        return "complete, fp16" if self.variant == "fp16" else "complete"

    def summary(self):
        """One line for the list: size, family, what it needs and state, e.g. "6.9 GB, SDXL, 1024 px views, about
        8 GB of GPU memory, complete"."""
        return f"{format_size(self.size)}, {self.family_text}, {self.needs_text}, {self.state_text}"


def native_window_px(model_id, models):
    """The view size in image pixels of the model ``model_id`` (a hub id or path, as Generate sends it) among
    ``models`` (InstalledModel): its ``native_window_px``; DEFAULT_WINDOW_PX when it is not listed."""
    for model in models:
        if model.id == model_id:
            return model.native_window_px
    return DEFAULT_WINDOW_PX


# --- command lines ------------------------------------------------------------------------------------


def list_arguments(folders=()):
    """The arguments of ``python -m backend`` that list the installed models as JSON, also in ``folders``
    (local model folders, each passed as ``--folder``). Returns a tuple of strings."""
    arguments = ["models", "list", "--json"]
    for folder in folders:
        arguments += ["--folder", folder]
    return tuple(arguments)


def download_arguments(model_id, fp16=False):
    """The arguments of ``python -m backend`` that download the hub model ``model_id`` (its fp16 weights
    with ``fp16``) with JSON progress events. Returns a tuple of strings; the id comes after ``--``, so an id
    typed as "--help" is refused by the backend as not a hub id instead of read as an option."""
    return ("models", "download", "--json-progress") + (("--fp16",) if fp16 else ()) + ("--", model_id)


def remove_arguments(model_id):
    """The arguments of ``python -m backend`` that delete the hub model ``model_id`` from the cache."""
    return ("models", "remove", "--", model_id)  # "--": the id is never read as an option


# --- formatting ---------------------------------------------------------------------------------------

# Decimal units, as the backend and the Hugging Face hub show sizes.
_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def format_size(size):
    """Bytes (an int) as a short text: "5.2 GB", "350 MB", "12 B" (decimal units, as the hub shows them)."""
    for unit, scale in _UNITS:
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} B"


def format_progress(done, total):
    """Bytes done of a total as "1.2 / 5.1 GB": both numbers in the total's unit. Returns "" while the
    total is not known (0)."""
    if total <= 0:
        return ""
    unit, scale = next(((unit, scale) for unit, scale in _UNITS if total >= scale), ("B", 1))
    if unit == "B":
        return f"{int(done)} / {int(total)} B"
    return f"{done / scale:.1f} / {total / scale:.1f} {unit}"


# --- the installed models -----------------------------------------------------------------------------


def parse_model_list(text):
    """The models of ``models list --json`` output (a JSON array of objects). Returns a list of
    InstalledModel; raises ModelCommandError when ``text`` is not such an array."""
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ModelCommandError("The backend's model list is not a JSON array of models; see the backend's output "
                                f"{text.strip()[:80]!r}.")
    return [InstalledModel.from_dict(entry) for entry in entries]


def backend_sentence(stderr, fallback):
    """The backend's one-sentence error from a CLI command's ``stderr`` (its last line that starts with
    "error: ", without that prefix, in the panel's words: ``panel_words.in_panel_words``), else ``fallback``
    followed by stderr's last line when there is one."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return in_panel_words(line[len("error: "):])
    return f"{fallback}: {lines[-1]}" if lines else fallback + "."


def run_model_command(command, env, cwd, timeout_s):
    """Run a one-shot ``python -m backend models ...`` (``command`` is its argv) to its end.

    Returns the finished ``subprocess.CompletedProcess`` (text stdout and stderr) when it exited with 0;
    raises ModelCommandError with the backend's one sentence otherwise, or when it could not start or ran
    longer than ``timeout_s`` seconds.
    """
    shown = " ".join(["python", *command[1:]])  # the interpreter's path is in the preferences
    try:
        result = subprocess.run(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, encoding="utf-8", errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ModelCommandError(f"'{shown}' did not finish within {timeout_s:g} seconds.") from None
    except OSError as error:
        raise ModelCommandError(f"The backend could not be started ({error}); check the backend Python in "
                                "the preferences.") from None
    if result.returncode != 0:
        raise ModelCommandError(backend_sentence(result.stderr, f"'{shown}' failed with exit code {result.returncode}"))
    return result


def list_installed(command, env, cwd, timeout_s=LIST_TIMEOUT_S):
    """The installed models: runs ``command`` (``list_arguments``' command line) and parses its JSON.
    Returns a list of InstalledModel; raises ModelCommandError with one sentence."""
    return parse_model_list(run_model_command(command, env, cwd, timeout_s).stdout)


def remove_installed(command, env, cwd, timeout_s=REMOVE_TIMEOUT_S):
    """Delete a hub model from the cache: runs ``command`` (``remove_arguments``' command line). Returns the
    backend's report ("removed ID from the Hugging Face cache, freeing 5.2 GB"); raises ModelCommandError with
    the backend's sentence (a local path is refused, a model not in the cache is named)."""
    result = run_model_command(command, env, cwd, timeout_s)
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "The model was removed from the Hugging Face cache."


# The last listing, shared by the preferences and the panel's model menu. A list is replaced whole, never
# changed in place, so a listing that finishes on another thread (refresh_in_background) is safe to read.
_models = None
_listing_error = None


def cached_models():
    """The models of the last successful listing (a list of InstalledModel; empty before the first)."""
    return list(_models or ())


def has_listed():
    """True once a listing has succeeded in this Blender session."""
    return _models is not None


def listing_error():
    """The last listing's error sentence, or None when it succeeded."""
    return _listing_error


def refresh(command, env, cwd, timeout_s=LIST_TIMEOUT_S):
    """List the installed models with ``command`` (see ``list_installed``) and keep the result for
    ``cached_models``. Returns the models; on failure keeps the previous list, remembers the sentence for
    ``listing_error`` and raises ModelCommandError."""
    global _models, _listing_error
    try:
        models = list_installed(command, env, cwd, timeout_s)
    except ModelCommandError as error:
        _listing_error = str(error)
        raise
    _models, _listing_error = models, None
    return models


def refresh_in_background(command, env, cwd):
    """Start ``refresh`` on a daemon thread (its error lands in ``listing_error``); returns the thread."""

    def run():
        try:
            refresh(command, env, cwd)
        except ModelCommandError:
            pass  # kept for listing_error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def looks_like_path(model):
    """True when the model text names a local folder or file rather than a hub id (as the backend tells them
    apart: an absolute path, or one starting with ".", "~" or holding a backslash)."""
    return os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model


def model_choices(models, default_model):
    """The panel's model menu: a list of ``(model id, label, description)``.

    First the backend's default (DEFAULT_MODEL), then every model in ``models`` (InstalledModel), then
    ``default_model`` (the preferences' Default Model, a typed hub id or path) when it is none of those; a
    blank ``default_model`` is left out. A hub id that is not installed is labelled so (Generate downloads
    it), as is a partial model.
    """
    by_id = {model.id: model for model in models}
    ids = [DEFAULT_MODEL] + [model.id for model in models]
    if default_model.strip():
        ids.append(default_model)
    choices = []
    for model_id in dict.fromkeys(ids):  # in order, each once
        model = by_id.get(model_id)
        if model is not None:
            label = model.label if model.complete else f"{model.label} (partial)"
            choices.append((model_id, label, f"{model.summary()}: {model.path}"))
        elif looks_like_path(model_id):
            choices.append((model_id, model_id,
                            "A local model typed in Default Model; it is not in the Model Folder, so it is not listed"))
        else:
            choices.append((model_id, f"{model_id} (not installed)",
                            "Not in the model cache: Generate downloads it first (with online access)"))
    return choices


# --- downloads ----------------------------------------------------------------------------------------


class ModelDownload:
    """One ``models download ID --json-progress`` process, followed through its protocol events.

    command: its argv (``download_arguments``' command line); env, cwd: its environment and working folder.
    A thread reads stdout into a queue; ``poll`` handles what has arrived, without blocking (a modal
    operator's timer calls it), ``wait`` blocks until the end (background mode, where timers never fire).
    While it runs, ``bytes_done`` of ``bytes_total`` and ``current_file`` tell the progress (``bytes_total``
    is 0 until the first event). It ends as 'done' (``path``: the model's snapshot folder), 'error'
    (``error``: the backend's sentence) or 'cancelled'. Finished files stay in the cache either way, so a
    later download of the same model resumes.
    """

    def __init__(self, command, env, cwd, model_id):
        self.command, self.env, self.cwd, self.model_id = list(command), env, cwd, model_id
        self.process = None
        self.state = "new"
        self.bytes_done, self.bytes_total, self.current_file = 0, 0, None
        self.path = None
        self.error = None
        self._events = queue.Queue()
        self._stderr_tail = collections.deque(maxlen=_STDERR_LINES)
        self._readers = []
        self._cancelling = False

    @property
    def finished(self):
        """True once the download is done, failed or cancelled."""
        return self.state in ("done", "error", "cancelled")

    @property
    def fraction(self):
        """Bytes done / total, 0 while the total is not known."""
        return self.bytes_done / self.bytes_total if self.bytes_total > 0 else 0.0

    def status_text(self):
        """One line for the preferences: "Downloading ID: 1.2 / 5.1 GB" while running, else how it ended."""
        if self.state == "done":
            return f"Downloaded {self.model_id}"
        if self.state == "error":
            return self.error
        if self.state == "cancelled":
            return f"Download of {self.model_id} cancelled; downloading it again resumes it"
        progress = format_progress(self.bytes_done, self.bytes_total)
        return f"Downloading {self.model_id}: {progress}" if progress else f"Starting the download of {self.model_id}"

    def start(self):
        """Start the process and its reader threads. A process that cannot start ends the download as 'error'."""
        try:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        except OSError as error:
            self._fail(f"The backend could not be started ({error}); check the backend Python in the preferences.")
            return
        self.state = "running"
        self._readers = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_events(self):
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").strip()
            try:
                self._events.put(protocol.parse_event(line))
            except protocol.ProtocolError:
                if line:  # stdout carries protocol lines only; anything else helps explain a failure
                    self._stderr_tail.append(line)
        self._events.put({"event": _EXITED, "code": self.process.wait()})

    def _read_stderr(self):
        for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                self._stderr_tail.append(line)

    def poll(self, wait_s=0.0):
        """Handle the events that have arrived, waiting up to ``wait_s`` seconds for the first one.
        Returns ``finished``."""
        while self.state == "running":
            try:
                event = self._events.get(timeout=wait_s) if wait_s > 0 else self._events.get_nowait()
            except queue.Empty:
                break
            wait_s = 0.0
            self._handle(event)
        return self.finished

    def wait(self, timeout_s=None, on_progress=None):
        """Block until the download ends or ``timeout_s`` seconds pass; returns ``finished``.
        on_progress: called with the download after every change of ``status_text()`` (e.g. to print it)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        shown = None
        while not self.poll(wait_s=0.25):
            if on_progress is not None and self.status_text() != shown:
                shown = self.status_text()
                on_progress(self)
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.finished

    def cancel(self, grace_s=5.0):
        """Stop the download and end as 'cancelled', unless it finished first. The files fetched so far stay
        in the cache. The process gets Ctrl-C (POSIX; Windows: terminated) and is killed if it has not
        exited after ``grace_s`` seconds."""
        if self.finished or self.process is None:
            return
        self._cancelling = True
        try:
            if os.name == "posix":
                # Ctrl-C, as in a terminal: huggingface_hub deletes the file it was writing, whereas a killed
                # process leaves it in the cache, where the model then looks partial until it is removed.
                self.process.send_signal(signal.SIGINT)
            else:
                self.process.terminate()  # a child without a console of its own cannot be sent Ctrl-C
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        except OSError:
            pass  # it exited meanwhile
        for reader in self._readers:
            reader.join(timeout=grace_s)
        self.poll()

    def _handle(self, event):
        kind = event.get("event")
        if kind == "progress" and event.get("stage") == "downloading":
            self.bytes_done, self.bytes_total = int(event.get("step") or 0), int(event.get("total") or 0)
            self.current_file = event.get("file")
        elif kind == "done":
            self.path = (event.get("outputs") or {}).get("model")
            self.state = "done"
        elif kind == "error":
            self._fail(in_panel_words(event.get("message"))
                       or f"The download of {self.model_id} failed without a message.")
        elif kind == _EXITED:
            if self._cancelling:
                self.state = "cancelled"
            else:
                for reader in self._readers:
                    reader.join(timeout=1.0)  # the stderr reader may still hold the last lines
                detail = f": {self._stderr_tail[-1]}" if self._stderr_tail else ""
                self._fail(f"The download of {self.model_id} stopped unexpectedly (exit code {event['code']}){detail}")

    def _fail(self, message):
        self.error, self.state = message, "error"


# The download started last (running or finished): one at a time, and the preferences show its progress.
_download = None


def start_download(command, env, cwd, model_id):
    """Start a ModelDownload of ``model_id`` with ``command`` (``download_arguments``' command line) and make
    it the current one; returns it (already failed when its process could not start). Raises
    ModelCommandError while another download runs."""
    global _download
    if is_downloading():
        raise ModelCommandError(f"{_download.model_id} is still downloading; cancel it or wait until it has finished.")
    _download = ModelDownload(command, env, cwd, model_id)
    _download.start()
    return _download


def current_download():
    """The download started last (running or finished), or None."""
    return _download


def is_downloading():
    """True while a download runs."""
    return _download is not None and not _download.finished


@atexit.register
def _stop_download_at_exit():
    """Blender quits during a download: stop it as Cancel does, rather than leave the process running."""
    if is_downloading():
        _download.cancel(grace_s=2.0)
