"""``python -m backend serve --stdio``: the long-lived worker Blender talks to (docs/protocol.md).

The main thread reads request lines from stdin; one worker thread runs generate jobs one at a time from
a queue, keeping the model loaded between jobs. Events go to stdout, one JSON line each, and nothing
else does: whatever libraries print is sent to stderr. Cancel is honoured before the next denoising step.
No network socket is ever opened.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import traceback

from .. import __version__, protocol
from ..errors import BadRequest, SyncSphereError


class StdioServer:
    """Reads requests from ``requests`` (lines) and writes events to ``events`` (a text stream)."""

    def __init__(self, requests, events):
        self.requests = requests
        self.events = events
        self.write_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        self.stopping = threading.Event()
        self.models = None  # an engine.models.ModelCache, created by the worker (it imports torch)

    def send(self, event: dict) -> None:
        """Write one event line and flush it, whole, even when two threads send at once."""
        with self.write_lock:
            self.events.write(protocol.encode(event) + "\n")
            self.events.flush()

    def serve(self) -> int:
        """Handle requests until shutdown or end of input; returns the exit code (0)."""
        worker = threading.Thread(target=self._run_jobs, name="syncsphere-jobs", daemon=True)
        worker.start()
        for line in self.requests:
            if not line.strip():
                continue
            try:
                request = protocol.parse_request(line)
            except protocol.ProtocolError as error:
                self.send(protocol.error_event(None, "bad_request", str(error)))
                continue
            op = request["op"]
            if op == "hello":
                self.send(self._ready_event())
            elif op == "generate":
                self.jobs.put(request)
            elif op == "cancel":
                self.cancelled.add(request["job"])
            elif op == "shutdown":
                break
        self.jobs.put(None)
        # A job in progress stops at its next step; one that is writing finishes its files first.
        self.stopping.set()
        worker.join()
        return 0

    def _ready_event(self) -> dict:
        # Import the engine (torch, diffusers) now: "ready" means a job can start without a long silent
        # import, which a client watching for a hung backend would otherwise mistake for a hang.
        from diffusers import StableDiffusionPipeline  # noqa: F401

        from . import job  # noqa: F401
        from ..engine.models import resolve_device, resolve_dtype

        device = resolve_device("auto")
        return protocol.ready_event(__version__, str(device), str(resolve_dtype("auto", device)).replace("torch.", ""))

    def _is_cancelled(self, job: str) -> bool:
        return job in self.cancelled or self.stopping.is_set()

    def _run_jobs(self) -> None:
        while (request := self.jobs.get()) is not None:
            job = request["job"]
            if self._is_cancelled(job):
                self.send(protocol.error_event(job, "cancelled", "The job was cancelled before it started."))
                continue
            try:
                outputs = self._generate(job, request)
            except SyncSphereError as error:
                self.send(protocol.error_event(job, error.kind, str(error)))
            except Exception as error:  # the worker must survive anything a job throws
                traceback.print_exc(file=sys.stderr)
                self.send(protocol.error_event(job, "internal", f"Internal error ({type(error).__name__}: {error}); see the backend log."))
            else:
                self.send(protocol.done_event(job, outputs))
            finally:
                self.cancelled.discard(job)

    def _generate(self, job: str, request: dict) -> dict:
        from ..engine.models import ModelCache
        from .job import check_request, run_job
        from ..request import GenerateRequest

        if "out" in request["params"]:
            raise BadRequest("Pass the output folder as the request's out_dir, not as params.out.")
        checked = check_request(GenerateRequest.from_params({**request["params"], "out": request["out_dir"]}))
        self.models = self.models or ModelCache()

        def report(stage, step, total, preview):
            self.send(protocol.progress_event(job, stage, step, total))
            return self._is_cancelled(job)

        return run_job(checked, report, self.models)


def serve_stdio() -> int:
    """Run the stdio server on this process's stdin/stdout; returns the exit code."""
    events = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return StdioServer(sys.stdin, events).serve()
