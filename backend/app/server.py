"""``python -m backend serve --stdio``: the long-lived worker Blender talks to (docs/protocol.md).

The main thread reads request lines from stdin; one worker thread runs generate jobs one at a time from
a queue, keeping the model loaded between jobs. Events go to stdout, one JSON line each, and nothing
else does: whatever libraries print is sent to stderr. Cancel is honoured before the next denoising step.
No network socket is ever opened. A ``fetch`` sends a finished job's files back as events (for a client on
another machine, ``ssh HOST python -m backend serve --stdio``), on a thread of its own so jobs go on meanwhile.

Nothing a client sends may stop the worker: stdin is read as bytes with a bounded line length, every line
that is not a valid request gets exactly one bad_request event, an event is always writable, and both
threads outlive any exception a line or a job raises.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import queue
import sys
import threading
import traceback

from .. import __version__, protocol
from ..errors import BadRequest, SyncSphereError, shorten

_BLANK = b" \t\r"  # JSON's whitespace besides the newline: a line of only these is skipped unanswered
FETCHABLE_JOBS = 100
"""How many finished jobs' files a worker can still send (``fetch``); the oldest are forgotten first."""


class _Job:
    """One generate request while it is queued or running; ``cancelled`` is set by a cancel that arrives then."""

    def __init__(self, request: dict):
        self.id: str = request["job"]
        self.request = request
        self.cancelled = threading.Event()


class StdioServer:
    """Reads requests from ``requests`` (a binary stream of lines) and writes events to ``events`` (a binary
    stream)."""

    def __init__(self, requests, events):
        self.requests = requests
        self.events = events
        self.write_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        # The jobs queued or running: a cancel marks those with its id, so it never outlives them.
        self.active: list[_Job] = []
        self.active_lock = threading.Lock()
        self.stopping = threading.Event()
        self.runner = JobRunner()  # keeps the model loaded between jobs
        # The outputs of the last FETCHABLE_JOBS done jobs, by job id: what a fetch may send, and nothing else.
        self.finished: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.fetches: queue.Queue = queue.Queue()

    def send(self, event: dict) -> None:
        """Write one event line and flush it, whole, even when two threads send at once. Never raises: an
        event always encodes (``protocol.encode``), and a closed stdout means the client is gone."""
        try:
            line = (protocol.encode(event) + "\n").encode("utf-8")
        except (TypeError, ValueError) as error:  # a value JSON cannot hold: the job still gets its one answer
            traceback.print_exc(file=sys.stderr)
            failed = protocol.error_event(event.get("job"), "internal", f"The backend could not write its answer ({type(error).__name__}); see the backend log.")
            line = (protocol.encode(failed) + "\n").encode("utf-8")
        with self.write_lock:
            try:
                self.events.write(line)
                self.events.flush()
            except (OSError, ValueError) as error:
                print(f"An event could not be written ({error}); the client has gone.", file=sys.stderr)

    def serve(self) -> int:
        """Handle requests until shutdown or end of input; returns the exit code (0)."""
        worker = threading.Thread(target=self._run_jobs, name="syncsphere-jobs", daemon=True)
        worker.start()
        sender = threading.Thread(target=self._run_fetches, name="syncsphere-fetches", daemon=True)
        sender.start()
        while (raw := protocol.read_line(self.requests)) is not None:
            if not raw.strip(_BLANK):
                continue
            try:
                if not self._handle(raw):
                    break
            except Exception as error:  # a bug in handling one line must not end the worker
                traceback.print_exc(file=sys.stderr)
                self.send(protocol.error_event(None, "internal", f"Internal error ({type(error).__name__}); see the backend log."))
        self.jobs.put(None)
        self.fetches.put(None)
        # A job in progress stops at its next step; one that is writing finishes its files first; a fetch stops
        # before its next chunk.
        self.stopping.set()
        worker.join()
        sender.join()
        return 0

    def _handle(self, raw: bytes) -> bool:
        """Answer one request line (bytes without the newline); returns False for shutdown."""
        try:
            request = protocol.parse_request(protocol.decode_line(raw))
        except protocol.ProtocolError as error:
            self.send(protocol.error_event(error.job, "bad_request", str(error)))
            return True
        op = request["op"]
        if op == "hello":
            self.send(self._ready_event())
        elif op == "generate":
            job = _Job(request)
            with self.active_lock:
                self.active.append(job)
            self.jobs.put(job)
        elif op == "fetch":
            outputs = self.finished.get(request["job"])
            if outputs is None:
                self.send(protocol.error_event(request["job"], "bad_request", f"No finished job {shorten(request['job'])} "
                                               f"to send the files of: a worker sends the files of its last "
                                               f"{FETCHABLE_JOBS} done jobs only."))
            else:
                self.fetches.put((request["job"], outputs))
        elif op == "cancel":
            # Only the jobs queued or running now; a cancel for no such job (one that has just finished, or
            # one not sent yet) does nothing and is not answered.
            with self.active_lock:
                for job in self.active:
                    if job.id == request["job"]:
                        job.cancelled.set()
        return op != "shutdown"

    def _ready_event(self) -> dict:
        # Import the engine (torch, diffusers) now: "ready" means a job can start without a long silent
        # import, which a client watching for a hung backend would otherwise mistake for a hang.
        from diffusers import StableDiffusionPipeline  # noqa: F401

        from . import job  # noqa: F401
        from ..engine.models import resolve_device, resolve_dtype

        device = resolve_device("auto")
        return protocol.ready_event(__version__, str(device), str(resolve_dtype("auto", device)).replace("torch.", ""))

    def _is_cancelled(self, job: _Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def _run_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._run_job(job)
            except Exception:  # the job thread must outlive anything, or no job would be answered again
                traceback.print_exc(file=sys.stderr)
            finally:
                with self.active_lock:
                    self.active.remove(job)

    def _run_job(self, job: _Job) -> None:
        if self._is_cancelled(job):
            self.send(protocol.error_event(job.id, "cancelled", "The job was cancelled before it started."))
            return
        outputs = self.runner.run(job.id, job.request["params"], job.request["out_dir"], self.send,
                                  lambda: self._is_cancelled(job))
        if outputs is not None:
            self.finished[job.id] = outputs
            while len(self.finished) > FETCHABLE_JOBS:
                self.finished.popitem(last=False)
            self.send(protocol.done_event(job.id, outputs))

    def _run_fetches(self) -> None:
        while (fetch := self.fetches.get()) is not None:
            job, outputs = fetch
            try:
                self._send_files(job, output_paths(outputs))
            except OSError as error:
                self.send(protocol.error_event(job, "internal", f"The job's file {error.filename or ''} could not be "
                                               f"read ({error.strerror or error}); nothing more was sent."))
            except Exception as error:  # the thread must outlive anything, or no fetch would be answered again
                traceback.print_exc(file=sys.stderr)
                self.send(protocol.error_event(job, "internal", f"Internal error ({type(error).__name__}) while sending "
                                               "the job's files; see the backend log."))

    def _send_files(self, job: str, paths: list[str]) -> None:
        """Send the job's files as events (``file_events``); stops quietly when the worker is stopping."""
        for event in file_events(job, paths, self.stopping.is_set):
            self.send(event)


class JobRunner:
    """Runs generate jobs one at a time with the model kept loaded between them (``engine.models.ModelCache``):
    the one way a worker runs a job, whether the stdio server's job thread or a Ray Serve replica
    (``serve_ray``)."""

    def __init__(self):
        self.models = None  # an engine.models.ModelCache, created by the first job (it imports torch)

    def run(self, job_id: str, params: dict, out_dir: str, send, is_cancelled) -> dict | None:
        """Run the job ``job_id`` (protocol ``params``, written into the absolute ``out_dir``), sending its
        progress events with ``send(event)``; ``is_cancelled()`` is asked at every report (True stops the job
        before its next step). Returns the done event's ``outputs`` (the caller sends the done event), or None
        when the job ended with an error, whose event (kind cancelled, bad_request, …) was sent here. Never raises
        for a failing job."""
        try:
            return self._generate(job_id, params, out_dir, send, is_cancelled)
        except SyncSphereError as error:
            send(protocol.error_event(job_id, error.kind, str(error)))
        except Exception as error:  # the worker must survive anything a job throws
            traceback.print_exc(file=sys.stderr)
            send(protocol.error_event(job_id, "internal", f"Internal error ({type(error).__name__}: {error}); see the backend log."))
        return None

    def _generate(self, job_id: str, params: dict, out_dir: str, send, is_cancelled) -> dict:
        from ..engine.models import ModelCache
        from .job import check_request, run_job
        from ..products.files import output_lock
        from ..request import GenerateRequest

        if "out" in params:
            raise BadRequest("Pass the output folder as the request's out_dir, not as params.out.")

        timer = protocol.StepTimer()

        def report(stage, step, total, preview):
            send(protocol.progress_event(job_id, stage, step, total, preview,
                                         seconds_per_step=timer.seconds_per_step(stage, step)))
            return is_cancelled()

        # Held from the check to the last file, so a CLI run or another worker cannot use the folder meanwhile.
        with output_lock(out_dir):
            checked = check_request(GenerateRequest.from_params({**params, "out": out_dir}))
            self.models = self.models or ModelCache()
            return run_job(checked, report, self.models)


def file_events(job: str, paths: list[str], stopping=lambda: False):
    """The events that send the files ``paths`` of the job ``job`` (a fetch, docs/protocol.md): for each file a
    ``file`` event (size and SHA-256, read first) and its ``chunk`` events, then ``fetched``. A generator; it
    ends early, without ``fetched``, when ``stopping()`` turns True between chunks. Raises OSError when a file
    cannot be read or changes while it is sent."""
    total = 0
    for index, path in enumerate(paths, 1):
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as file:
            while data := file.read(1 << 20):
                digest.update(data)
                size += len(data)
        yield protocol.file_event(job, path, size, digest.hexdigest(), index, len(paths))
        offset = 0
        with open(path, "rb") as file:
            while data := file.read(protocol.FILE_CHUNK_BYTES):
                if stopping():
                    return
                yield protocol.chunk_event(job, path, offset, data)
                offset += len(data)
        if offset != size:
            raise OSError(0, f"it changed while it was sent ({size} bytes, then {offset})", path)
        total += size
    yield protocol.fetched_event(job, len(paths), total)


def output_paths(outputs: dict) -> list[str]:
    """Every file path in a done event's ``outputs`` (nested ones too: the cube map's faces), in order."""
    paths = []
    for value in outputs.values():
        paths.extend(output_paths(value) if isinstance(value, dict) else [value] if isinstance(value, str) else [])
    return paths


def serve_stdio() -> int:
    """Run the stdio server on this process's stdin/stdout (as bytes: the protocol is UTF-8 whatever the
    locale); returns the exit code."""
    requests, events = sys.stdin.buffer, sys.stdout.buffer
    with contextlib.redirect_stdout(sys.stderr):
        return StdioServer(requests, events).serve()
