"""The add-on's client of a shared SyncSphere server (Backend = Server: ``python -m backend serve --ray``, its HTTP
API in backend/app/http_api.py and docs/running.md).

Plain Python (no bpy), standard library only (urllib: the add-on ships no third-party packages). ``ServerWorker``
presents the stdio worker's interface (``worker_client.BackendWorker``: start, send, next_event, stop) to
``GenerationJob``, so a job on a server is followed, cancelled and its files received exactly as a job over SSH:
the same event objects arrive in the same queue, and the files come back through ``remote_files.ReceivedFiles``,
checked against their SHA-256 before anything is put into the local job folder. A lost connection ends the job
with one sentence, and the next job connects again.

The token is sent only in the Authorization header, only over https (or http to this computer), and is never
written to a log or a message.
"""

import dataclasses
import http.client
import ipaddress
import json
import os
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request

from ...backend import protocol

SERVER_NEEDS_ONLINE_ACCESS = ("Backend = Server connects to another machine: turn on Allow Online Access in Blender's "
                              "Preferences > System > Network, or set Backend to Local")
"""Why a server backend is not used while Blender's online access is off (docs/conventions.md#blender-rules)."""
REQUEST_TIMEOUT_S = 30.0
"""Seconds a short request (hello, submit, cancel) may take."""
STREAM_TIMEOUT_S = 60.0
"""Seconds an event stream may stay silent (the server sends a blank line every 15 s) before it counts as lost."""
_ALIVE = "_alive"
"""The event a keep-alive line becomes: GenerationJob counts it as a sign of life and otherwise ignores it."""
RECONNECTS = 3
"""How many times a dropped event stream is opened again (from the next event: none is lost) before the job fails."""


@dataclasses.dataclass(frozen=True)
class ServerBackend:
    """A shared server (the preferences' Backend = Server): ``url`` its base URL (``https://gpu.studio:8443``), and
    its bearer token, typed (``token``) or in a file (``token_file``, read when used). ``repr`` never shows it."""

    url: str
    token: str = dataclasses.field(default="", repr=False)
    token_file: str = ""

    @property
    def host(self):
        """The server's host and port, for messages."""
        return urllib.parse.urlsplit(self.url.strip()).netloc or self.url.strip()

    def problem(self):
        """Why this server cannot be used as set, in one sentence, or None."""
        parts = urllib.parse.urlsplit(self.url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return (f"The Server URL must look like https://host:port (the address of 'python -m backend serve "
                    f"--ray' or its TLS proxy), not {self.url.strip()!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            return (f"The Server URL {self.url.strip()} is plain http to another machine, which would send the token "
                    "in clear text: use the https address of its TLS proxy (docs/running.md)")
        try:
            self.bearer()
        except ValueError as error:
            return str(error)
        return None

    def bearer(self):
        """The token (from ``token_file`` when one is set); raises ValueError with one sentence when there is none."""
        token = self.token.strip()
        if self.token_file.strip():
            path = os.path.expanduser(self.token_file.strip())
            try:
                with open(path, encoding="utf-8") as file:
                    token = file.read().strip()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"The Server Token File {path} cannot be read "
                                 f"({getattr(error, 'strerror', None) or error})") from None
        if not token:
            raise ValueError("No server token is set: type it (or choose the file that holds it) in the SyncSphere "
                             "preferences")
        return token

    def job_folder(self, local_job_folder):
        """The folder sent as a job's out_dir: the server ignores it and picks its own (``ServerWorker.output_folder``)."""
        return local_job_folder

    def request(self, method, path, body=None, timeout=REQUEST_TIMEOUT_S):
        """Send one request to the API; returns the open response (a file-like object of the body). Raises
        ``ServerError`` with one sentence for a refused request (its HTTP status) or an unreachable server."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Authorization": f"Bearer {self.bearer()}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url.strip().rstrip("/") + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            sentence = _error_sentence(error)
            error.close()
            if error.code == 401:
                raise ServerError(f"The server at {self.host} refused the token (HTTP 401): check the Server Token in "
                                  "the SyncSphere preferences.", 401) from None
            raise ServerError(sentence, error.code) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise ServerError(f"The server at {self.host} cannot be reached ({reason}).", None) from None

    def hello(self):
        """The server's ready event (GET /v1/hello); raises ServerError."""
        with self.request("GET", "/v1/hello") as response:
            event = json.loads(response.read())
        if not isinstance(event, dict) or event.get("event") != "ready":
            raise ServerError(f"The server at {self.host} did not answer as a SyncSphere server.", None)
        return event


class ServerError(Exception):
    """A request the server refused or could not take; ``str()`` is one sentence, ``status`` the HTTP status (None
    when no answer came)."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def check_server(server):
    """Check Backend with Backend = Server: ``(ok, text)`` as ``backend_command.run_backend`` returns, from the
    server's hello. Never raises."""
    problem = server.problem()
    if problem:
        return False, problem
    try:
        event = server.hello()
    except (ServerError, ValueError) as error:
        return False, str(error)
    return True, (f"Server {server.host}: SyncSphere {event.get('version')}, protocol {event.get('protocol')}, "
                  f"device {event.get('device')}, dtype {event.get('dtype')}")


class ServerWorker:
    """A shared server presented as a backend worker (``worker_client.BackendWorker``'s interface) to
    ``GenerationJob``: ``send`` turns the protocol's requests into the API's (generate: submit, then a thread
    streams the job's events into ``events``; fetch: a thread streams its files' events; cancel), with the
    server's job ids replaced by the client's own in every event. log_path: a log of what went wrong (no token)."""

    def __init__(self, server, log_path):
        self.server = server
        self.remote = server  # GenerationJob: a backend elsewhere, whose files come back through fetch
        self.command = None
        self.log_path = log_path
        self.events = queue.Queue()
        self.ready = None
        self.jobs = {}  # the client's job id -> (the server's job id, the server's job folder)
        self.stopping = threading.Event()
        self.last_message = ""

    @property
    def where(self):
        """Where the backend runs, for messages: "at HOST"."""
        return f"at {self.server.host}"

    def is_alive(self):
        """True once the server answered hello (until ``stop``)."""
        return self.ready is not None

    def start(self, timeout_s=REQUEST_TIMEOUT_S):
        """Ask the server for its ready event (once); returns it. Raises WorkerError with one sentence."""
        from .worker_client import WorkerError

        if self.ready is not None:
            return self.ready
        problem = self.server.problem()
        if problem:
            raise WorkerError(problem)
        try:
            event = self.server.hello()
        except ServerError as error:
            self._log(str(error))
            raise WorkerError(f"{str(error).rstrip('.')}; see the log at {self.log_path}.") from None
        if not (isinstance(event.get("protocol"), int) and event["protocol"] >= protocol.FETCH_PROTOCOL):
            raise WorkerError(f"The server at {self.server.host} speaks protocol {event.get('protocol')}, too old to "
                              f"send a job's files back (it needs {protocol.FETCH_PROTOCOL}).")
        # Fresh for this connection: the threads of an earlier one, stopped, cannot put events here.
        self.stopping, self.events = threading.Event(), queue.Queue()
        self.ready = event
        return event

    def send(self, request):
        """Carry out one protocol request (generate, cancel, fetch; hello and shutdown need nothing). A request the
        server refuses as bad (400) ends the job with its sentence as an error event; other failures raise
        WorkerError."""
        from .worker_client import WorkerError

        op, job = request.get("op"), request.get("job")
        try:
            if op == "generate":
                self._submit(job, request["params"])
            elif op == "cancel" and job in self.jobs:
                self.server.request("POST", f"/v1/jobs/{self.jobs[job][0]}/cancel").close()
            elif op == "fetch" and job in self.jobs:
                self._follow(job, f"/v1/jobs/{self.jobs[job][0]}/files", until=("fetched", "error"))
        except ServerError as error:
            self._log(str(error))
            if error.status in (400, 404, 409):  # about this job: its one sentence, as the stdio worker says it
                self.events.put(protocol.error_event(job, "bad_request", str(error)))
                return
            self.ready = None  # the next job says hello again (the server may have restarted)
            raise WorkerError(f"{str(error).rstrip('.')}; see the log at {self.log_path}.") from None

    def _submit(self, job, params):
        with self.server.request("POST", "/v1/jobs", params) as response:
            answer = json.loads(response.read())
        self.jobs[job] = (answer["job"], answer["out_dir"])
        self._follow(job, f"/v1/jobs/{answer['job']}/events", until=("done", "error"), resumable=True)

    def output_folder(self, job, requested):
        """The folder on the server the job ``job`` wrote its files into (the server picks it; ``requested`` is
        ignored)."""
        return self.jobs.get(job, (None, requested))[1]

    def _follow(self, job, path, until, resumable=False):
        """Stream the events at ``path`` into ``events`` on a thread, as ``job``'s, until one of kind in ``until``.
        A resumable stream (a job's events) that drops is opened again from the next event, RECONNECTS times."""
        threading.Thread(target=self._stream, args=(job, path, until, resumable, self.events, self.stopping),
                         daemon=True).start()

    def _stream(self, job, path, until, resumable, events, stopping):
        received, failures, lost = 0, 0, None
        while not stopping.is_set():
            try:
                query = f"?from={received}" if resumable else ""
                with self.server.request("GET", path + query, timeout=STREAM_TIMEOUT_S) as response:
                    for raw in response:
                        if stopping.is_set():
                            return
                        line = raw.decode("utf-8", errors="replace").strip()
                        if not line:  # the server's keep-alive: a job waiting in its queue for a GPU is not hung
                            events.put({"event": _ALIVE, "job": job})
                            continue
                        event = {**protocol.parse_event(line), "job": job}
                        received += 1
                        events.put(event)
                        if event["event"] in until:
                            return
                reason = "the server ended the stream early"
            except ServerError as error:
                reason = str(error).rstrip(".")
            except (OSError, http.client.HTTPException) as error:  # a reset, a timeout, a stream cut mid-chunk
                reason = f"the stream was cut: {type(error).__name__}"
            except ValueError:  # protocol.ProtocolError
                reason = "the server sent a line that is not protocol JSON"
            lost = lost or reason  # what happened first, not the reconnections that followed
            failures += 1
            if not resumable or failures > RECONNECTS or stopping.wait(failures):  # 1, 2, 3 s: a proxy restarting
                break
        if stopping.is_set():
            return
        message = (f"The connection to the server at {self.server.host} was lost ({lost}); the next job connects "
                   f"again; see the log at {self.log_path}.")
        self._log(message)
        events.put(protocol.error_event(job, "internal", message))

    def next_event(self, timeout_s):
        """The next event, or None after ``timeout_s`` seconds without one (0: do not wait)."""
        try:
            return self.events.get(timeout=timeout_s) if timeout_s > 0 else self.events.get_nowait()
        except queue.Empty:
            return None

    def stop(self, grace_s=5.0):
        """Stop following the server's streams (its jobs go on there unless cancelled); the next job says hello
        again."""
        self.stopping.set()
        self.ready = None

    def last_log_line(self):
        """The last problem written to the log, at most 200 characters ("" when none)."""
        return self.last_message[:200]

    def _log(self, message):
        self.last_message = message
        try:
            os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"server {self.server.host}: {message}\n")
        except OSError:
            pass  # a log that cannot be written must not hide the sentence the job shows


def _is_loopback(hostname):
    """Whether ``hostname`` is this computer (localhost or a loopback address)."""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _error_sentence(error):
    """The server's sentence in an error answer (``{"error": ...}``), or one naming the HTTP status."""
    try:
        sentence = json.loads(error.read())["error"]
        if isinstance(sentence, str) and sentence:
            return sentence
    except (ValueError, KeyError, TypeError, OSError):
        pass
    return f"The server answered HTTP {error.code} {error.reason}."
