"""The HTTP API of ``python -m backend serve --ray`` (docs/running.md, "Ray Serve"; docs/protocol.md, "HTTP").

The same jobs and the same event objects as the stdio protocol, over HTTP, for several artists sharing a pool of
GPUs. Ray-free: ``serve_ray`` puts ``JobApi`` in a Ray Serve ingress deployment and hands it ``run_events``, which
runs a job on a replica and yields its events. Every route answers JSON errors as ``{"error": sentence}``.

    GET  /v1/hello                 the protocol's ready event
    POST /v1/jobs                  body: the generate request's params (JSON) -> 202 {"job": id, "out_dir": folder}
    GET  /v1/jobs/ID/events?from=N the job's events from the N-th (0: all), one JSON object a line, until its done
                                   or error event; a blank line every KEEPALIVE_S seconds while nothing happens
    GET  /v1/jobs/ID/files         a done job's files as the protocol's file, chunk and fetched events (SHA-256)
    POST /v1/jobs/ID/cancel        -> 202; the job's last event is then an error of kind cancelled

Every request needs ``Authorization: Bearer TOKEN`` (compared in constant time: 401 otherwise); a body longer than
MAX_BODY_BYTES is refused (413), a bad one gets the request check's one sentence (400); more than ``max_jobs`` jobs
queued or running, or more than ``max_streams`` responses streaming at once, are refused (429).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import os
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import protocol
from ..errors import BadRequest, shorten
from .server import file_events, output_paths

MAX_BODY_BYTES = 64 << 10
"""The largest job submission body read (64 KiB; a job's params are well under 4 KiB)."""
MAX_JOBS = 64
"""Jobs queued or running at once, by default; one more is refused with 429 until one ends."""
MAX_STREAMS = 128
"""Event and file streams open at once, by default; one more is refused with 429."""
KEEPALIVE_S = 15.0
"""A quiet event stream sends a blank line this often, so a proxy or client does not take it for a dead one."""
KEPT_JOBS = 200
"""How many ended jobs' events and files stay available; the oldest are forgotten first."""
MIN_TOKEN_CHARS = 16
"""The shortest token a token file may hold (``secrets.token_urlsafe(32)`` makes 43 characters)."""
NDJSON = "application/x-ndjson"


class ApiError(Exception):
    """A request refused with an HTTP ``status`` and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_token_file(path: str) -> str:
    """The bearer token in the file ``path`` (its only line, surrounding whitespace ignored). Raises BadRequest
    with one sentence when the file is missing or unreadable, or the token is shorter than MIN_TOKEN_CHARS or has
    whitespace inside."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise BadRequest(f"The token file {path} cannot be read ({getattr(error, 'strerror', None) or error}); "
                         "make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE.") from None
    if len(token) < MIN_TOKEN_CHARS or any(character.isspace() for character in token):
        raise BadRequest(f"The token file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters without "
                         "spaces; make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE.")
    return token


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of ``token``: what the API keeps and compares, so the token itself is kept nowhere."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_host(host: str, allow_remote: bool) -> None:
    """Raise BadRequest unless ``host`` is a loopback address (or ``localhost``) or ``allow_remote`` is set."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise BadRequest(f"--host {host} is not a loopback address, so other machines could reach the API; pass "
                         "--allow-remote to mean it, with TLS in front of it (docs/running.md).")


class _Job:
    """One submitted job: its events so far (``events``), whether it has ended, its outputs once done, and the
    asyncio task that follows it on a replica."""

    def __init__(self, job_id: str, out_dir: str):
        self.id = job_id
        self.out_dir = out_dir
        self.events: list[dict] = []
        self.outputs: dict | None = None
        self.ended = False
        self.cancelled = False
        self.changed = asyncio.Event()  # set (and replaced) whenever an event arrives
        self.task: asyncio.Task | None = None
        self.stream = None  # what run_events returned, cancelled with the job when it can be

    def add(self, event: dict) -> None:
        """Record ``event`` (with this job's id) and wake the streams waiting for it."""
        event = {**event, "job": self.id}
        self.events.append(event)
        if event["event"] == "done":
            self.outputs = event["outputs"]
        self.ended = self.ended or event["event"] in ("done", "error")
        self.changed.set()
        self.changed = asyncio.Event()


class JobApi:
    """The API's routes and jobs (an ASGI handler: ``await api(request)`` returns a Starlette Response).

    token_sha256: ``token_digest`` of the bearer token; out_root: the folder each job is written into
    (``OUT/<job id>/``); run_events(job id, params, out_dir): an async iterator of the job's events (progress,
    then done or error), whose consumer task may be cancelled; ready: the hello answer (the protocol's ready
    event); max_jobs, max_streams: the 429 bounds.
    """

    def __init__(self, token_sha256: str, out_root: str, run_events, ready: dict, max_jobs: int = MAX_JOBS,
                 max_streams: int = MAX_STREAMS):
        self.token_sha256 = token_sha256
        self.out_root = out_root
        self.run_events = run_events
        self.ready = ready
        self.max_jobs = max_jobs
        self.max_streams = max_streams
        self.jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self.streams = 0

    async def __call__(self, request: Request) -> Response:
        """Answer one HTTP request (see the module's routes)."""
        try:
            self._authenticate(request)
            return await self._route(request)
        except ApiError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse({"error": str(error)}, status_code=error.status, headers=headers)

    def _authenticate(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared as digests in constant time: neither the token's length nor its bytes leak through timing.
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        if not (scheme.lower() == "bearer") & hmac.compare_digest(given, self.token_sha256):
            raise ApiError(401, "This server needs its token: send the header Authorization: Bearer TOKEN.")

    async def _route(self, request: Request) -> Response:
        parts = [part for part in request.url.path.split("/") if part]
        method = request.method
        if parts == ["v1", "hello"] and method == "GET":
            return JSONResponse(self.ready)
        if parts == ["v1", "jobs"] and method == "POST":
            return await self._submit(request)
        if len(parts) == 4 and parts[:2] == ["v1", "jobs"]:
            job = self.jobs.get(parts[2])
            if job is None:
                raise ApiError(404, f"No job {shorten(parts[2])} on this server (it keeps the last "
                                    f"{KEPT_JOBS} ended jobs).")
            if parts[3] == "events" and method == "GET":
                return self._stream(self._events(job, _start_index(request)))
            if parts[3] == "files" and method == "GET":
                return self._files(job)
            if parts[3] == "cancel" and method == "POST":
                self._cancel(job)
                return JSONResponse({"job": job.id}, status_code=202)
        raise ApiError(404, f"No route {method} {shorten(request.url.path)}; see docs/running.md.")

    async def _submit(self, request: Request) -> Response:
        from ..request import GenerateRequest

        params = protocol_params(await _read_body(request))
        if "out" in params:
            raise ApiError(400, "A job has no out: the server writes it into a folder of its own, and GET "
                                "/v1/jobs/ID/files sends its files.")
        active = sum(not job.ended for job in self.jobs.values())
        if active >= self.max_jobs:
            raise ApiError(429, f"The server has {active} jobs queued or running, its limit; submit again when one "
                                "has ended.")
        job = _Job(f"job-{secrets.token_hex(8)}", "")
        job.out_dir = os.path.join(self.out_root, job.id)
        try:  # the standard-library checks, before anything is queued: one sentence for a bad request
            GenerateRequest.from_params({**params, "out": job.out_dir}).validated()
        except (BadRequest, TypeError) as error:
            raise ApiError(400, str(error)) from None
        self.jobs[job.id] = job
        self._forget_old_jobs()
        job.task = asyncio.get_running_loop().create_task(self._follow(job, params))
        return JSONResponse({"job": job.id, "out_dir": job.out_dir}, status_code=202)

    async def _follow(self, job: _Job, params: dict) -> None:
        """Run the job on a replica and record its events; it ends with exactly one done or error event."""
        try:
            job.stream = self.run_events(job.id, params, job.out_dir)
            async for event in job.stream:
                job.add(event)
                if job.ended:
                    break
        except asyncio.CancelledError:
            pass  # a cancel: recorded below
        except Exception as error:  # a replica that died or a lost node: the job ends with one sentence
            if not job.ended and not job.cancelled:
                job.add(protocol.error_event(job.id, "internal", f"The replica running the job failed "
                                                                 f"({type(error).__name__}); submit it again."))
        if not job.ended:
            job.add(protocol.error_event(job.id, "cancelled", "The job was cancelled.") if job.cancelled else
                    protocol.error_event(job.id, "internal", "The replica ended the job without a result; submit it again."))

    def _cancel(self, job: _Job) -> None:
        if job.ended or job.cancelled:
            return
        job.cancelled = True
        cancel = getattr(job.stream, "cancel", None)
        if cancel is not None:  # Ray Serve's response: the replica's generator is cancelled, the job stops
            cancel()
        job.task.cancel()

    async def _events(self, job: _Job, start: int):
        index = start
        while True:
            while index < len(job.events):
                yield protocol.encode(job.events[index]) + "\n"
                index += 1
            if job.ended:
                return
            changed = job.changed
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield "\n"

    def _files(self, job: _Job) -> Response:
        if job.outputs is None:
            raise ApiError(409, f"The job {job.id} has no files to send: it is not done "
                                f"({'it ended with an error' if job.ended else 'it is still running'}).")

        def events():
            try:
                for event in file_events(job.id, output_paths(job.outputs)):
                    yield protocol.encode(event) + "\n"
            except OSError as error:
                yield protocol.encode(protocol.error_event(job.id, "internal", f"The job's file {error.filename or ''} "
                                                           f"could not be read ({error.strerror or error}); nothing "
                                                           "more was sent.")) + "\n"

        return self._stream(events())

    def _stream(self, lines) -> Response:
        if self.streams >= self.max_streams:
            raise ApiError(429, f"The server has {self.streams} streams open, its limit; try again in a moment.")
        # Events must reach the client as they happen: no cache, and no buffering in an nginx proxy in front.
        return StreamingResponse(_counted(lines, self), media_type=NDJSON,
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _forget_old_jobs(self) -> None:
        ended = [job.id for job in self.jobs.values() if job.ended]
        for job_id in ended[: max(0, len(ended) - KEPT_JOBS)]:
            del self.jobs[job_id]


async def _counted(lines, api: JobApi):
    """``lines`` (a sync or async iterator of str) as an async iterator that holds one of the API's stream slots
    from its first line to its end (a client gone included)."""
    api.streams += 1
    try:
        if hasattr(lines, "__aiter__"):
            async for line in lines:
                yield line
        else:
            while (line := await asyncio.to_thread(next, lines, None)) is not None:
                yield line
    finally:
        api.streams -= 1


def protocol_params(body: bytes) -> dict:
    """The job's params in a submission body (UTF-8 JSON, one object); raises ApiError 400 with the protocol's
    sentence otherwise."""
    try:
        return protocol.parse_params(protocol.decode_line(body))
    except protocol.ProtocolError as error:
        raise ApiError(400, str(error).replace("line", "body")) from None


async def _read_body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY_BYTES (413 beyond, refused before reading when Content-Length says so)."""
    too_long = ApiError(413, f"The request body is longer than {MAX_BODY_BYTES} bytes; a job's params are a few.")
    try:
        if int(request.headers.get("content-length", "0")) > MAX_BODY_BYTES:
            raise too_long
    except ValueError:
        raise ApiError(400, "The Content-Length header is not a number.") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_long
    return bytes(body)


def _start_index(request: Request) -> int:
    try:
        start = int(request.query_params.get("from", "0"))
    except ValueError:
        start = -1
    if start < 0:
        raise ApiError(400, "from must be the number of events already received (0 or more).")
    return start
