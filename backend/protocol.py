"""The JSON-lines protocol between Blender and the backend, version 1 (docs/protocol.md).

Standard library only: the Blender side imports this module too. One JSON object per line, UTF-8;
the backend's stdout carries protocol lines only.
"""

from __future__ import annotations

import json
import os

PROTOCOL_VERSION = 2  # 2: the stage "downloading" (step and total count bytes)
STAGES = ("downloading", "loading", "denoising", "decoding", "writing")
ERROR_KINDS = ("bad_request", "model_not_found", "out_of_memory", "cancelled", "internal")
REQUEST_OPS = ("hello", "generate", "cancel", "shutdown")


class ProtocolError(ValueError):
    """A line that is not a valid protocol request or event; ``str()`` is one sentence for the user."""


def encode(message: dict) -> str:
    """One protocol line (no newline) for an event or request dict."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def write_event(stream, event: dict) -> None:
    """Write ``event`` to ``stream`` as one protocol line and flush it, so the reader sees it at once."""
    stream.write(encode(event) + "\n")
    stream.flush()


def progress_event(job: str | None, stage: str, step: int, total: int, preview: str | None = None) -> dict:
    """A progress event: ``stage`` one of STAGES, ``step`` of ``total`` done, optional preview PNG path."""
    return {"event": "progress", "job": job, "stage": stage, "step": step, "total": total, "preview": preview}


def done_event(job: str | None, outputs: dict) -> dict:
    """A done event; ``outputs`` maps names (png, exr, metadata; for equirect jobs also dice, horizon,
    faces: {F, R, B, L, U, D: path}, and with HDR exr_sky and lighting) to absolute paths."""
    return {"event": "done", "job": job, "outputs": outputs}


def error_event(job: str | None, kind: str, message: str) -> dict:
    """An error event; ``kind`` one of ERROR_KINDS, ``message`` one readable sentence."""
    return {"event": "error", "job": job, "kind": kind if kind in ERROR_KINDS else "internal", "message": message}


def ready_event(version: str, device: str, dtype: str) -> dict:
    """The answer to hello: protocol version, backend version, default device and dtype."""
    return {"event": "ready", "protocol": PROTOCOL_VERSION, "version": version, "device": device, "dtype": dtype}


def hello_request() -> dict:
    """The request the client sends first; the backend answers with a ready event."""
    return {"op": "hello"}


def generate_request(job: str, params: dict, out_dir: str) -> dict:
    """A generate request: ``params`` uses the CLI's flag names in snake_case, ``out_dir`` is absolute."""
    return {"op": "generate", "job": job, "params": params, "out_dir": out_dir}


def cancel_request(job: str) -> dict:
    """A cancel request: the job stops before its next denoising step, with an error event of kind cancelled."""
    return {"op": "cancel", "job": job}


def shutdown_request() -> dict:
    """The request that makes the backend exit (cancelling a job in progress)."""
    return {"op": "shutdown"}


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

    generate needs a string ``job``, an object ``params`` and an absolute ``out_dir``; cancel needs ``job``.
    """
    message = _decode(line)
    if not isinstance(message, dict):
        raise ProtocolError("A request must be a JSON object.")
    op = message.get("op")
    if op not in REQUEST_OPS:
        raise ProtocolError(f"Unknown op {op!r}; expected one of {', '.join(REQUEST_OPS)}.")
    if op in ("generate", "cancel") and not isinstance(message.get("job"), str):
        raise ProtocolError(f"A {op} request needs a string job id.")
    if op == "generate":
        if not isinstance(message.get("params"), dict):
            raise ProtocolError("A generate request needs a params object.")
        out_dir = message.get("out_dir")
        if not isinstance(out_dir, str) or not os.path.isabs(out_dir):
            raise ProtocolError("A generate request needs an absolute out_dir.")
    return message


def _decode(line: str):
    """The JSON value of one protocol line; raises ProtocolError when it is not JSON."""
    try:
        return json.loads(line)
    except ValueError:
        raise ProtocolError("The line is not valid JSON.") from None
