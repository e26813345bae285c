"""The JSON-lines protocol between Blender and the backend, version 3 (docs/protocol.md).

Standard library only: the Blender side imports this module too. One JSON object per line, UTF-8;
the backend's stdout carries protocol lines only. A request line goes through ``read_line`` (bytes, its
length bounded), ``decode_line`` (UTF-8) and ``parse_request`` (JSON and the request's shape); each refuses
what it cannot take with a ProtocolError, never another exception.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time

from .errors import shorten

PROTOCOL_VERSION = 3  # 2: the stage "downloading" (step and total count bytes); 3: fetch, a job's files as events
STAGES = ("downloading", "loading", "denoising", "decoding", "writing")
ERROR_KINDS = ("bad_request", "model_not_found", "out_of_memory", "cancelled", "internal")
REQUEST_OPS = ("hello", "generate", "cancel", "fetch", "shutdown")
FETCH_PROTOCOL = 3
"""The first protocol version with ``fetch`` (a remote backend must speak at least this one)."""

FILE_CHUNK_BYTES = 3 << 16
"""The bytes of a file one ``chunk`` event carries (192 KiB, 256 KiB as base64: a line well under 1 MiB)."""

MAX_LINE_BYTES = 1 << 20
"""The longest request line the backend reads (1 MiB, without its newline); a longer one is refused whole."""
MAX_DEPTH = 64
"""The deepest nesting of arrays and objects in a request line; a request needs 3."""
MAX_MESSAGE_CHARS = 1000
"""An error event's message is cut to this many characters, whatever it quotes."""

_DISCARD_CHUNK = 1 << 16
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str from valid UTF-8 has none; only a JSON \u escape makes one


class ProtocolError(ValueError):
    """A line that is not a valid protocol request or event; ``str()`` is one sentence for the user.

    ``job`` is the request's job id when the line could be read far enough to find one (a JSON object with a
    string ``job``), else None: the bad_request event names it, so the client that sent it hears of it."""

    def __init__(self, message: str, job: str | None = None):
        super().__init__(message)
        self.job = job


def encode(message: dict) -> str:
    """One protocol line (no newline) for an event or request dict. The result always encodes as UTF-8: a
    string that does not (a lone surrogate, e.g. from a file name's undecodable bytes) is written as its JSON
    ``\\u`` escape, so writing a line never fails on its content."""
    line = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    if _LONE_SURROGATE.search(line):
        line = json.dumps(message, ensure_ascii=True, separators=(",", ":"))
    return line


def write_event(stream, event: dict) -> None:
    """Write ``event`` to ``stream`` as one protocol line and flush it, so the reader sees it at once."""
    stream.write(encode(event) + "\n")
    stream.flush()


def progress_event(job: str | None, stage: str, step: int, total: int, preview: str | None = None,
                   seconds_per_step: float | None = None) -> dict:
    """A progress event: ``stage`` one of STAGES, ``step`` of ``total`` done, optional preview PNG path, and for
    the denoising stage the wall seconds of the step just done (``StepTimer``); the field is left out when None."""
    event = {"event": "progress", "job": job, "stage": stage, "step": step, "total": total, "preview": preview}
    if seconds_per_step is not None:
        event["seconds_per_step"] = seconds_per_step
    return event


class StepTimer:
    """The ``seconds_per_step`` of one job's progress events: the wall seconds of the denoising step just
    reported, measured from the previous step's report to this one's (so it is the last step's time, not a
    mean: a SyncDiffusion-guided step shows as slower than a plain one).

    Feed it every progress report of the job, in order (``seconds_per_step``). None on the first step (no step
    before it to time from: the time since loading is not a step's), on every other stage, and when the
    steps restart from 1 (an out-of-memory retry). ``clock`` returns seconds (default ``time.monotonic``).
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.previous: tuple[int, float] | None = None  # (step, time) of the last denoising report

    def seconds_per_step(self, stage: str, step: int) -> float | None:
        """The seconds of denoising step ``step`` (rounded to milliseconds), or None (see the class)."""
        now = self.clock()
        previous, self.previous = self.previous, (step, now) if stage == "denoising" else None
        if previous is None or stage != "denoising" or step != previous[0] + 1:
            return None
        return round(now - previous[1], 3)


def done_event(job: str | None, outputs: dict) -> dict:
    """A done event; ``outputs`` maps names (png, exr, metadata; for equirect jobs also dice, horizon,
    faces: {F, R, B, L, U, D: path}, and with HDR exr_sky and lighting) to absolute paths."""
    return {"event": "done", "job": job, "outputs": outputs}


def error_event(job: str | None, kind: str, message: str) -> dict:
    """An error event; ``kind`` one of ERROR_KINDS, ``message`` one readable sentence."""
    if len(message) > MAX_MESSAGE_CHARS:  # the last guard against a message that quotes a huge value
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return {"event": "error", "job": job, "kind": kind if kind in ERROR_KINDS else "internal", "message": message}


def ready_event(version: str, device: str, dtype: str) -> dict:
    """The answer to hello: protocol version, backend version, default device and dtype."""
    return {"event": "ready", "protocol": PROTOCOL_VERSION, "version": version, "device": device, "dtype": dtype}


def file_event(job: str, path: str, size: int, sha256: str, index: int, count: int) -> dict:
    """The start of one file of a fetched job: its absolute ``path`` on the backend, ``size`` in bytes, the
    SHA-256 of its bytes (hex), and which file it is (``index`` 1…``count``). Its ``chunk`` events follow."""
    return {"event": "file", "job": job, "path": path, "size": size, "sha256": sha256, "index": index, "count": count}


def chunk_event(job: str, path: str, offset: int, data: bytes) -> dict:
    """``data`` (at most FILE_CHUNK_BYTES bytes of the file ``path``, from byte ``offset``) as base64."""
    return {"event": "chunk", "job": job, "path": path, "offset": offset,
            "data": base64.b64encode(data).decode("ascii")}


def fetched_event(job: str, files: int, size: int) -> dict:
    """The end of a fetch: ``files`` files of ``size`` bytes in all were sent."""
    return {"event": "fetched", "job": job, "files": files, "bytes": size}


def hello_request() -> dict:
    """The request the client sends first; the backend answers with a ready event."""
    return {"op": "hello"}


def generate_request(job: str, params: dict, out_dir: str) -> dict:
    """A generate request: ``params`` uses the CLI's flag names in snake_case, ``out_dir`` is absolute."""
    return {"op": "generate", "job": job, "params": params, "out_dir": out_dir}


def cancel_request(job: str) -> dict:
    """A cancel request: the job stops before its next denoising step, with an error event of kind cancelled."""
    return {"op": "cancel", "job": job}


def fetch_request(job: str) -> dict:
    """A fetch request: the backend sends every output file of the finished job ``job`` as ``file`` and
    ``chunk`` events, then ``fetched`` (or an ``error`` with the job's id)."""
    return {"op": "fetch", "job": job}


def shutdown_request() -> dict:
    """The request that makes the backend exit (cancelling a job in progress)."""
    return {"op": "shutdown"}


def read_line(stream, limit: int = MAX_LINE_BYTES) -> bytes | None:
    """The next line of the binary ``stream`` without its newline, or None at the end of input.

    A line longer than ``limit`` bytes is read to its end in chunks and dropped, keeping only its first
    ``limit + 1`` bytes, so memory stays bounded and ``decode_line`` refuses it as too long.
    """
    raw = stream.readline(limit + 1)
    if not raw:
        return None
    if raw.endswith(b"\n"):
        return raw[:-1]
    rest = raw if len(raw) > limit else b""
    while rest and not rest.endswith(b"\n"):
        rest = stream.readline(_DISCARD_CHUNK)
    return raw


def decode_line(raw: bytes) -> str:
    """The text of one request line (bytes, without its newline); raises ProtocolError when it is longer than
    MAX_LINE_BYTES or not UTF-8. A leading UTF-8 byte order mark is dropped."""
    if len(raw) > MAX_LINE_BYTES:
        raise ProtocolError(f"The line is longer than {MAX_LINE_BYTES} bytes; it was skipped.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ProtocolError(f"The line is not valid UTF-8{hint}: byte 0x{raw[error.start]:02x} at offset "
                            f"{error.start}; send UTF-8 JSON.") from None


def parse_event(line: str) -> dict:
    """Parse one event line from the backend. Returns the event dict; raises ProtocolError when the line is not
    a JSON object with a string ``event``.

    The event name is not checked against the known ones, so a client reads a newer backend's extra events and
    ignores what it does not know.
    """
    message = _decode(line)
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise ProtocolError("An event must be a JSON object with an event name.")
    return message


def parse_request(line: str) -> dict:
    """Parse and check one request line. Returns the request dict; raises ProtocolError.

    The line must be one JSON object, nested at most MAX_DEPTH deep, with finite numbers and no lone
    surrogates (``\\ud800`` escapes: no UTF-8 text has them, and no file name or output could carry them).
    generate needs a string ``job``, an object ``params`` and an absolute ``out_dir``; cancel and fetch need ``job``.
    The ProtocolError names the line's job id when it has one.
    """
    message = _decode(line)
    job = message.get("job") if isinstance(message, dict) and isinstance(message.get("job"), str) else None
    try:
        _check_values(message, 1)
        _check_request(message)
    except ProtocolError as error:
        raise ProtocolError(str(error), job) from None
    return message


def parse_params(text: str) -> dict:
    """Parse the ``params`` object of a generate request sent on its own (the body of the HTTP API's job
    submission, backend/app/http_api.py), checked as ``parse_request`` checks a line's values. Returns the dict;
    raises ProtocolError."""
    value = _decode(text)
    _check_values(value, 1)
    if not isinstance(value, dict):
        raise ProtocolError("A job's params must be a JSON object.")
    return value


def _check_request(message) -> None:
    """The request's shape: an object with a known op and what that op needs."""
    if not isinstance(message, dict):
        raise ProtocolError("A request must be a JSON object.")
    op = message.get("op")
    if op not in REQUEST_OPS:
        raise ProtocolError(f"Unknown op {shorten(op)}; expected one of {', '.join(REQUEST_OPS)}.")
    if op in ("generate", "cancel", "fetch") and not isinstance(message.get("job"), str):
        raise ProtocolError(f"A {op} request needs a string job id.")
    if op == "generate":
        if not isinstance(message.get("params"), dict):
            raise ProtocolError("A generate request needs a params object.")
        out_dir = message.get("out_dir")
        if not isinstance(out_dir, str) or not os.path.isabs(out_dir):
            raise ProtocolError("A generate request needs an absolute out_dir.")


def _check_values(value, depth: int) -> None:
    """Refuse nesting deeper than MAX_DEPTH, numbers that are not finite and strings with lone surrogates
    anywhere in ``value`` (at ``depth``: 1 for the line's own value). Recursion stops at MAX_DEPTH + 1."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            raise ProtocolError("The line has text that is not valid Unicode (a lone surrogate).")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"The line has a number that is not finite ({value!r}); send finite numbers only.")
    elif isinstance(value, (list, dict)):
        if depth > MAX_DEPTH:
            raise ProtocolError(f"The line is nested deeper than {MAX_DEPTH} levels.")
        for key in value if isinstance(value, dict) else ():
            _check_values(key, depth)
        for item in value.values() if isinstance(value, dict) else value:
            if isinstance(item, (str, float, list, dict)):
                _check_values(item, depth + 1)


def _decode(line: str):
    """The JSON value of one protocol line; raises ProtocolError when it is not JSON."""
    try:
        return json.loads(line)
    except RecursionError:  # the C parser's guard, far below the stack's end: the worker lives on
        raise ProtocolError(f"The line is nested deeper than {MAX_DEPTH} levels.") from None
    except json.JSONDecodeError:
        raise ProtocolError("The line is not valid JSON.") from None
    except ValueError:  # Python's limit on the digits of an int (sys.set_int_max_str_digits)
        raise ProtocolError("The line has a number with too many digits.") from None
