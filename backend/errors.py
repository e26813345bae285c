"""Errors the backend reports to a user, each with one readable sentence.

``kind`` is the protocol's error kind (docs/protocol.md); ``exit_code`` is what the CLI exits with.
Standard library only: the protocol and the Blender side may import it.
"""


class SyncSphereError(Exception):
    """Base class: ``str(error)`` is one sentence meant for the user."""

    kind = "internal"
    exit_code = 1


class BadRequest(SyncSphereError):
    """The request cannot be run as given (impossible size, unknown option, unreadable path)."""

    kind = "bad_request"
    exit_code = 2


class ModelNotFound(SyncSphereError):
    """The model is neither a readable local path nor reachable/cached on the hub."""

    kind = "model_not_found"
    exit_code = 2


class OutOfMemory(SyncSphereError):
    """The device ran out of memory during the job."""

    kind = "out_of_memory"
    exit_code = 3


class JobCancelled(SyncSphereError):
    """The job was cancelled before it finished; nothing was written."""

    kind = "cancelled"
    exit_code = 130


ECHO_LIMIT = 100
"""The most characters of a user's value an error message repeats: a 10 MB field must not make a 10 MB message."""


def shorten(value, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to at most ``limit`` characters (ending in "…" when cut).
    Works for any value, including strings with lone surrogates and objects whose repr is huge."""
    try:
        text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    except RecursionError:  # a deeply nested list or dict
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 1] + "…"
