"""A stand-in for the Hugging Face hub's file API on 127.0.0.1, serving repos from local folders.

Test code only (the backend has no HTTP client of its own). It answers what huggingface_hub's
``HfApi.model_info`` and ``hf_hub_download`` ask, as the real hub does:

- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: the repo's id, commit
  (``sha``) and ``siblings``; with ``?blobs=True`` (``files_metadata=True``) each sibling also has its size.
- ``GET /api/models/{repo_id}/tree/{revision}``: the file listing ``list_repo_tree`` and ``snapshot_download``
  read.
- ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{filename}``: the file, with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` and ``Accept-Ranges``; a ``Range: bytes=N-`` request gets ``206`` and the rest of the file.
- Errors carry the hub's ``X-Error-Code`` header (``RepoNotFound``, ``EntryNotFound``, ``GatedRepo``), which
  huggingface_hub turns into its typed errors.

Switches for tests: ``cut_next_download(filename)`` sends half of that file's next download and drops the
connection (with ``then_down=True`` the hub then answers 503 to everything until ``bring_up()``); ``gated``
holds repo ids whose files need a token. ``bytes_sent`` counts the file bytes sent, ``requests`` logs
``(method, path)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class ServedFile:
    path: str  # on disk
    size: int
    sha256: str


@dataclass
class ServedRepo:
    commit: str  # 40 hex digits, as a git commit id
    files: dict[str, ServedFile] = field(default_factory=dict)  # repo-relative name -> file


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HubServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving repos through the hub's file API.

    Use as a context manager, or call ``start()`` / ``stop()``. ``url`` is the value for ``HF_ENDPOINT``.
    """

    def __init__(self):
        self.repos: dict[str, ServedRepo] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self.down = False
        self._cut: tuple[str, bool] | None = None  # (filename, then_down)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_repo(self, repo_id: str, folder: str) -> str:
        """Serve every file under ``folder`` as the repo ``repo_id``; returns the repo's commit id, which
        changes with the files' names and contents."""
        files = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, folder).replace(os.sep, "/")
                files[relative] = ServedFile(path, os.path.getsize(path), _sha256(path))
        listing = "".join(f"{name}:{files[name].sha256}\n" for name in sorted(files))
        commit = hashlib.sha1((repo_id + "\n" + listing).encode()).hexdigest()
        self.repos[repo_id] = ServedRepo(commit, files)
        return commit

    def cut_next_download(self, filename: str, then_down: bool = False) -> None:
        """Send only half of ``filename``'s next GET, then drop the connection; with ``then_down`` the hub
        answers 503 to every request afterwards, until ``bring_up()``."""
        self._cut = (filename, then_down)

    def bring_up(self) -> None:
        """End the outage ``cut_next_download(..., then_down=True)`` started."""
        self.down = False

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.requests.clear()

    def downloaded(self) -> list[str]:
        """Paths (``repo/resolve/rev/file``) of the GET requests for files, in order."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def _take_cut(self, filename: str) -> bool | None:
        """None when ``filename``'s download is not to be cut, else whether the hub goes down afterwards."""
        with self._lock:
            if self._cut is None or self._cut[0] != filename:
                return None
            then_down = self._cut[1]
            self._cut = None
            return then_down

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestHub/1.0"

    def log_message(self, *args):  # keep the test output clean
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_HEAD(self):
        self._route(send_body=False)

    def do_GET(self):
        self._route(send_body=True)

    def _route(self, send_body: bool) -> None:
        self.hub.requests.append((self.command, self.path))
        if self.hub.down:
            return self._error(503, None, "The hub is down.", send_body)
        path = unquote(urlsplit(self.path).path)
        query = parse_qs(urlsplit(self.path).query)
        if path.startswith("/api/models/"):
            return self._api(path[len("/api/models/"):], query, send_body)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            return self._resolve(repo_id, revision, filename, send_body)
        self._error(404, None, "Not found.", send_body)

    # --- /api/models/... -------------------------------------------------------------------------------

    def _api(self, rest: str, query: dict, send_body: bool) -> None:
        tree = None
        if "/tree/" in rest:
            rest, tree = rest.split("/tree/", 1)
        elif "/revision/" in rest:
            rest = rest.split("/revision/", 1)[0]
        repo = self.hub.repos.get(rest)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found.", send_body)
        if tree is not None:
            body = [{"type": "file", "path": name, "size": f.size, "oid": f.sha256}
                    for name, f in sorted(repo.files.items())]
        else:
            with_sizes = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [{"rfilename": name, **({"size": f.size, "blobId": f.sha256} if with_sizes else {})}
                        for name, f in sorted(repo.files.items())]
            body = {"id": rest, "modelId": rest, "sha": repo.commit, "private": False,
                    "gated": "auto" if rest in self.hub.gated else False, "siblings": siblings}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    # --- /{repo_id}/resolve/{revision}/{filename} ------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found.", send_body)
        if repo_id in self.hub.gated:
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to "
                               "it and be authenticated to access it. Please log in.", send_body)
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id.", send_body)
        served = repo.files.get(filename)
        if served is None:
            return self._error(404, "EntryNotFound", "Entry not found.", send_body, commit=repo.commit)
        start = self._range_start()
        status, length = (206, served.size - start) if start else (200, served.size)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{served.sha256}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{served.size - 1}/{served.size}")
        self.end_headers()
        if send_body:
            self._send_file(served, filename, start, length)

    def _range_start(self) -> int:
        header = self.headers.get("Range", "")
        if not header.startswith("bytes="):
            return 0
        return int(header[len("bytes="):].split("-", 1)[0] or 0)

    def _send_file(self, served: ServedFile, filename: str, start: int, length: int) -> None:
        then_down = self.hub._take_cut(filename)
        to_send = length // 2 if then_down is not None else length
        with open(served.path, "rb") as f:
            f.seek(start)
            data = f.read(to_send)
        self.hub._count(len(data))  # before sending: once the client has the bytes, the count includes them
        self.wfile.write(data)
        self.wfile.flush()
        if then_down is not None:
            # Drop the connection half-way, as a network failure would: the client sees a short body.
            self.hub.down = then_down
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _error(self, status: int, code: str | None, message: str, send_body: bool, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if send_body:
            self.wfile.write(data)
