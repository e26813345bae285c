"""How every command-line command ends on an error: one sentence on stderr and the error's exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import SyncSphereError


def one_sentence_errors(work: Callable[[], int], interrupted: str) -> int:
    """Run ``work()`` and return its exit code; a SyncSphereError or Ctrl-C becomes one sentence on stderr
    prefixed ``error:`` (``interrupted`` for Ctrl-C) and its exit code (130 for Ctrl-C)."""
    try:
        return work()
    except SyncSphereError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
