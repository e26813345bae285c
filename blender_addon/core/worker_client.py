"""The Blender side of the protocol: the backend worker process and the jobs sent to it.

Plain Python (no bpy, no torch), so it is tested against a real backend without Blender. The worker is
``python -m backend serve --stdio`` (docs/protocol.md); requests and events are written and read with the
backend's own protocol module (``backend/protocol.py``, standard library only, shipped in the extension). A thread reads its stdout into a queue, and its
stderr goes to a log file that error messages point to. A job is followed either step by step
(``GenerationJob.poll``, from a modal operator's timer) or to its end (``GenerationJob.wait``, in
background mode, where Blender's timers never fire).

Whatever goes wrong (the worker dies, hangs, prints a malformed line or reports an error) the job ends
with one readable sentence in ``job.error``, and a broken worker is stopped so the next job starts a
fresh one.

A worker on another machine (``backend_command.RemoteBackend``: ``ssh HOST python -m backend serve --stdio``)
is the same worker behind an ssh process. Its job writes into the Remote Output Folder there; when it is done
the job fetches its files through the protocol into the local job folder (``remote_files.ReceivedFiles``:
checked against their SHA-256 before anything is put there) and only then is done, with local paths. A
dropped connection ends the job with one sentence, and the next job connects again.
"""

import itertools
import os
import queue
import subprocess
import threading
import time

from ...backend import protocol
from .panel_words import in_panel_words
from .remote_files import ReceivedFiles, TransferError

# Internal events the reader thread adds to the queue: the worker's stdout ended, or a line was not JSON.
_EXITED = "_exited"
_MALFORMED = "_malformed"
_job_numbers = itertools.count(1)


class WorkerError(Exception):
    """The worker could not be started or answered wrongly; ``str()`` is one sentence for the user."""


class BackendWorker:
    """One backend worker process: started on demand, restarted after it dies or is stopped.

    command: the argv that starts it (``backend_command.backend_command(python)``).
    env, cwd: its environment and working folder (``backend_command.backend_environment``).
    log_path: file that receives the worker's stderr (appended; created with its folder).
    remote: the ``RemoteBackend`` the command reaches over ssh, or None for a local worker.
    """

    def __init__(self, command, env, cwd, log_path, remote=None):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.remote = remote
        self.process = None
        self._log_start = 0  # where this start's lines begin in the log
        self.events = queue.Queue()
        self.ready = None  # the worker's ready event once it answered hello

    def is_alive(self):
        """True while the worker process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s=120.0):
        """Start the worker if it is not running and wait for its ready event; returns that event.

        Raises WorkerError when it cannot start or does not answer hello within ``timeout_s`` seconds.
        """
        if self.is_alive() and self.ready is not None:
            return self.ready
        self.stop()
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        log = open(self.log_path, "ab")
        self._log_start = log.tell()
        try:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, bufsize=0,
            )
        except OSError as error:
            check = "the SSH settings" if self.remote is not None else "the backend Python"
            raise WorkerError(f"The backend could not be started ({error}); check {check} in the preferences.")
        finally:
            log.close()  # the child holds its own handle
        self.events = queue.Queue()
        threading.Thread(target=self._read_events, args=(self.process, self.events), daemon=True).start()
        self.send(protocol.hello_request())
        event = self.next_event(timeout_s)
        if event is None or event.get("event") != "ready":
            self.stop()
            said = self.last_log_line()
            said = f", saying {said!r}" if said and self.remote is not None else ""  # ssh's complaint, e.g. a refused key
            raise WorkerError(f"The backend {self.where} did not start properly ({_describe(event, timeout_s)}{said}); "
                              f"see its log at {self.log_path}.")
        if self.remote is not None and not (isinstance(event.get("protocol"), int)
                                            and event["protocol"] >= protocol.FETCH_PROTOCOL):
            self.stop()
            raise WorkerError(f"The backend {self.where} speaks protocol {event.get('protocol')}, too old to send a job's "
                              f"files back (it needs {protocol.FETCH_PROTOCOL}); update the Remote SyncSphere Folder there.")
        self.ready = event
        return event

    def output_folder(self, job, requested):
        """The folder the worker wrote the job ``job``'s files into: ``requested``, the out_dir it was sent."""
        return requested

    @property
    def where(self):
        """Where the worker runs, for messages: "on HOST" for a remote one, else "" (a local one)."""
        return f"on {self.remote.host}" if self.remote is not None else ""

    def last_log_line(self):
        """The last line the worker (or ssh) wrote to the log since it was last started, at most 200 characters;
        "" when none."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                lines = log.read()[-4096:].decode("utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip()[:200] if lines else ""

    @staticmethod
    def _read_events(process, events):
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                event = protocol.parse_event(line)
            except protocol.ProtocolError:
                event = {"event": _MALFORMED, "line": line[:200]}
            events.put(event)
        events.put({"event": _EXITED, "code": process.wait()})

    def send(self, request):
        """Write one request line; raises WorkerError when the worker is gone."""
        try:
            self.process.stdin.write(_request_line(request))
            self.process.stdin.flush()
        except (OSError, AttributeError, ValueError):
            raise WorkerError(f"The backend is not running; see its log at {self.log_path}.")

    def next_event(self, timeout_s):
        """The next event, or None after ``timeout_s`` seconds without one (0: do not wait)."""
        try:
            return self.events.get(timeout=timeout_s) if timeout_s > 0 else self.events.get_nowait()
        except queue.Empty:
            return None

    def stop(self, grace_s=5.0):
        """Ask the worker to shut down, and kill it if it has not exited after ``grace_s`` seconds."""
        process, self.process, self.ready = self.process, None, None
        if process is None or process.poll() is not None:
            return
        try:
            process.stdin.write(_request_line(protocol.shutdown_request()))
            process.stdin.close()
            process.wait(timeout=grace_s)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


class GenerationJob:
    """One generate request followed to its end.

    params: the protocol's generate params (CLI flag names in snake_case); out_dir: absolute folder.
    hang_timeout_s: a running job that produces no event for this long is declared hung; the worker is
    killed. After the job ends, ``state`` is 'done' (``outputs`` holds the paths), 'cancelled' or 'error'
    (``error`` holds the sentence, a backend's in the panel's words: ``panel_words.in_panel_words``); while it
    runs, ``stage``, ``step`` and ``total`` tell the progress, and
    ``seconds_per_step`` the wall seconds of the last denoising step (None until the backend has timed one;
    ``status_text`` and ``progress_fraction`` put them into words and a bar). ``preview`` is the path of the
    canvas's preview PNG the backend named last (None before the first), ``preview_step`` and ``preview_total`` the
    denoising step it shows and its stage's total (kept apart from ``step``/``total``, which the next stage's
    events change, possibly within the same poll) and ``preview_count`` how many have arrived, so a follower sees when a new one came (the
    backend rewrites the same file in place and deletes it when the job ends: read it when it arrives).
    """

    def __init__(self, worker, params, out_dir, hang_timeout_s=600.0):
        self.worker = worker
        self.params = dict(params)
        self.out_dir = out_dir
        self.hang_timeout_s = hang_timeout_s
        self.id = f"job-{os.getpid()}-{next(_job_numbers)}"
        self.state = "new"
        self.stage, self.step, self.total = "starting", 0, 1
        self.seconds_per_step = None
        self.preview, self.preview_step, self.preview_total, self.preview_count = None, 0, 1, 0
        self.outputs = None
        self.error = None
        self._last_event_time = None
        self.received = None  # a remote job's files on their way here (ReceivedFiles), between done and fetched

    @property
    def finished(self):
        """True once the job is done, cancelled or failed."""
        return self.state in ("done", "cancelled", "error")

    @property
    def request_out_dir(self):
        """The folder the backend writes into: ``out_dir``, or for a remote worker the folder of the same name in
        its Remote Output Folder (the files then come back into ``out_dir``)."""
        return self.worker.remote.job_folder(self.out_dir) if self.worker.remote is not None else self.out_dir

    @property
    def progress_fraction(self):
        """How far the job is, 0..1, for a progress bar: the denoising steps done, or the files received; 0 in
        the other stages (loading and decoding take one event each, and downloading counts bytes, not steps)."""
        return self.step / max(self.total, 1) if self.stage in ("denoising", "receiving") else 0.0

    @property
    def status_text(self):
        """The job's stage in words, e.g. "Loading"; while denoising its step and, once the backend has timed a
        step, the seconds it took: "Denoising 12/50 · 0.8 s/step"."""
        if self.stage == "receiving":
            return f"Receiving files {self.step}/{self.total}"
        if self.stage != "denoising":
            return self.stage.capitalize()
        text = f"Denoising {self.step}/{self.total}"
        if self.seconds_per_step is not None:
            text += f" · {format_seconds(self.seconds_per_step)} s/step"
        return text

    def start(self):
        """Start the worker if needed and send the request. Failures end the job with an error."""
        try:
            self.worker.start()
            self.worker.send(protocol.generate_request(self.id, self.params, self.request_out_dir))
        except WorkerError as error:
            self._fail(str(error))
            return
        self.state = "running"
        self._last_event_time = time.monotonic()

    def cancel(self):
        """Ask the worker to stop this job before its next step (the job then ends as 'cancelled')."""
        if self.state == "running":
            try:
                self.worker.send(protocol.cancel_request(self.id))
            except WorkerError as error:
                self._fail(str(error))

    def poll(self, wait_s=0.0):
        """Handle the events that have arrived (waiting up to ``wait_s`` for the first); returns ``finished``."""
        while self.state == "running":
            event = self.worker.next_event(wait_s)
            wait_s = 0.0
            if event is None:
                if time.monotonic() - self._last_event_time > self.hang_timeout_s:
                    self.worker.stop(grace_s=0)
                    self._fail(f"The backend sent nothing for {self.hang_timeout_s:g} s and was stopped; "
                               f"the next job starts a new one; see its log at {self.worker.log_path}.")
                break
            self._last_event_time = time.monotonic()
            self._handle(event)
        return self.finished

    def wait(self, timeout_s=None):
        """Block until the job ends (or ``timeout_s`` passes); returns ``finished``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll(wait_s=0.5):
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.finished

    def _handle(self, event):
        kind = event.get("event")
        if kind == _EXITED and self.worker.remote is not None:
            self.worker.stop(grace_s=0)
            during = " while the job's files came back (nothing was written to the job folder)" if self.received else ""
            said = self.worker.last_log_line()
            said = f": {said!r}" if said else ""
            self._fail(f"The connection to the backend on {self.worker.remote.host} was lost{during} (exit code "
                       f"{event['code']}{said}); the next job connects again; see the log at {self.worker.log_path}.")
        elif kind == _EXITED:
            self.worker.stop(grace_s=0)
            self._fail(f"The backend stopped unexpectedly (exit code {event['code']}); the next job starts a new one; "
                       f"see its log at {self.worker.log_path}.")
        elif kind == _MALFORMED:
            self.worker.stop(grace_s=0)
            self._fail(f"The backend sent a line that is not protocol JSON ({event['line'][:60]!r}) and was stopped; "
                       f"see its log at {self.worker.log_path}.")
        elif event.get("job") != self.id:
            return  # an event of an earlier, abandoned job
        elif kind == "progress":
            self.stage, self.step, self.total = event["stage"], event["step"], event["total"]
            # Optional (older backends send none; the first step's event has none): the last step's seconds.
            seconds = event.get("seconds_per_step")
            self.seconds_per_step = seconds if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None
            preview = event.get("preview")  # optional too: a path on the steps the backend made one
            if isinstance(preview, str) and preview and (self.worker is None or self.worker.remote is None):  # a remote one is not here
                self.preview, self.preview_step, self.preview_total = preview, self.step, self.total
                self.preview_count += 1
        elif kind == "done" and self.worker.remote is not None:
            self._receive_files(event["outputs"])
        elif kind in ("file", "chunk", "fetched") and self.received is not None:
            self._take_file_event(event)
        elif kind == "done":
            self.outputs, self.state = event["outputs"], "done"
        elif kind == "error" and event.get("kind") == "cancelled":
            self.state = "cancelled"
        elif kind == "error":
            # The backend's sentence names CLI flags; the artist reads the panel's controls instead.
            self._fail(in_panel_words(event.get("message")) or "The backend reported an error without a message.")

    def _receive_files(self, remote_outputs):
        """The remote job is done: ask for its files, received into ``out_dir`` (``_take_file_event``)."""
        self.received = ReceivedFiles(self.worker.output_folder(self.id, self.request_out_dir), self.out_dir)
        self._remote_outputs = remote_outputs
        self.stage, self.step, self.total = "receiving", 0, 1
        try:
            self.worker.send(protocol.fetch_request(self.id))
        except WorkerError as error:
            self._fail(str(error))

    def _take_file_event(self, event):
        """One event of the job's files coming back; on ``fetched`` the files go into ``out_dir`` and the job is
        done with their local paths."""
        try:
            if event["event"] == "fetched":
                self.outputs, self.state = self.received.commit(event, self._remote_outputs), "done"
                self.received = None
                return
            self.received.add(event)
        except TransferError as error:
            self._fail(str(error))
            return
        if event["event"] == "file":
            self.step, self.total = self.received.files, max(self.received.count, 1)

    def _fail(self, message):
        if self.received is not None:  # a transfer cut short leaves nothing behind
            self.received.abort()
            self.received = None
        self.error, self.state = message, "error"


def format_seconds(seconds):
    """A duration in seconds as short text with two significant digits: "0.8", "0.83", "1.5", "12"; "<0.01"
    below a hundredth (a test model's steps)."""
    if seconds >= 10:
        return f"{seconds:.0f}"
    return f"{seconds:.2g}" if seconds >= 0.01 else "<0.01"


def _request_line(request):
    """One protocol line for ``request``, as the bytes the worker's stdin takes."""
    return (protocol.encode(request) + "\n").encode("utf-8")


def _describe(event, timeout_s):
    if event is None:
        return f"no answer within {timeout_s:g} s"
    if event.get("event") == _EXITED:
        return f"it exited with code {event['code']}"
    if event.get("event") == "error":
        return event.get("message", "an error")
    return f"it answered {protocol.encode(event)[:80]}"
