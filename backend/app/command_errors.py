"""How every command-line command ends on an error: one sentence on stderr and the error's exit code.

SyncSphere's own errors are their sentence; Ctrl-C (and SIGTERM, which ``sigterm_as_interrupt`` turns into
Ctrl-C) says truthfully what is on disk; anything else is a bug: its traceback, then one sentence naming it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from ..errors import SyncSphereError

NOTHING_WRITTEN = "Interrupted; nothing was written."


def one_sentence_errors(work: Callable[[], int], interrupted: str = NOTHING_WRITTEN, lock=None) -> int:
    """Run ``work()`` and return its exit code; an error becomes one sentence on stderr and its exit code
    (``report_failure``): ``interrupted`` for Ctrl-C unless ``lock`` (a ``files.output_lock``) says the new
    files were put in place."""
    try:
        return work()
    except (Exception, KeyboardInterrupt) as error:
        return report_failure(error, interrupted, lock)[2]


def report_failure(error: BaseException, interrupted: str = NOTHING_WRITTEN, lock=None) -> tuple[str, str, int]:
    """Print the one sentence for ``error`` on stderr, prefixed ``error:``, and return (the protocol's error
    kind, the sentence, the exit code): a SyncSphereError's own; for KeyboardInterrupt "cancelled",
    ``interrupted_message(lock, interrupted)`` and 130; for any other Exception its traceback first, then
    "internal", "Internal error (Type: message); see the traceback on stderr." and 1."""
    if isinstance(error, SyncSphereError):
        kind, sentence, code = error.kind, str(error), error.exit_code
    elif isinstance(error, KeyboardInterrupt):
        kind, sentence, code = "cancelled", interrupted_message(lock, interrupted), 130
    else:
        traceback.print_exception(error, file=sys.stderr)
        detail = " ".join(str(error).split())
        named = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        kind, sentence, code = "internal", f"Internal error ({named}); see the traceback on stderr.", 1
    print(f"error: {sentence}", file=sys.stderr)
    return kind, sentence, code


def interrupted_message(lock, interrupted: str = NOTHING_WRITTEN) -> str:
    """What an interrupted command says: ``interrupted`` unless ``lock`` (a ``files.output_lock``, or None)
    says its new files were already put in place, which then says so."""
    if lock is None or not lock.written:
        return interrupted
    if lock.kind == "file":
        return f"Interrupted after {lock.out} was written."
    return f"Interrupted after the new files were in place; {lock.out} holds the complete new set."


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt, so a killed command ends as Ctrl-C does: its clean-up
    runs and its message says what is on disk. Restores the previous handler after. Only the main thread can
    set handlers; elsewhere it does nothing."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
