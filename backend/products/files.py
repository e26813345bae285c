"""Writing outputs so that nobody ever sees a half-written file or a mixed set, and refusing to replace a
user's files by accident. Standard library only.

**A set of files replaces the folder's old set as a unit.** ``write_files_atomically`` writes every file of a
job (or of the ``cubemap`` and ``hdr`` commands) into a hidden folder beside the output folder OUT,
``.OUT.syncsphere-new-PID``, and only when all are written puts it in place of OUT:

- OUT does not exist: one rename.
- OUT exists: on Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically (OUT is never
  missing); where the system or file system cannot exchange, OUT is renamed to ``.OUT.syncsphere-old-PID``
  and the new folder to OUT (OUT is missing between the two renames, never mixed). Then the old folder is
  *retired*: entries that are not files of this set (the user's own files, other outputs) are moved back
  into OUT, the old set's files are deleted (with --overwrite an equirect --no-hdr run replaces lighting.json
  by nothing), and the emptied folder is removed. An entry never replaces one of the same name in OUT: then
  the old folder stays, nothing of the user's is deleted.

A single file (the ``view`` command's) is written to ``.NAME.syncsphere-new-PID`` beside it and renamed
onto it (``write_file_atomically``); a rename within a folder is atomic.

**One run per output at a time.** ``output_lock(OUT)`` holds an advisory lock on ``.OUT.syncsphere-lock``
beside OUT (``fcntl.flock``; ``msvcrt.locking`` on Windows), which the system releases when a process dies;
a second run is refused at once with one sentence naming the holder's pid. The CLI and the worker hold it
from the request's check to the end of the job; ``check_output_folder``, ``check_output_file`` and the
writers take it too (re-entrant within a thread), so no path writes unlocked. The lock file records the
holder's pid and, while a set is being swapped, the set's file names; it is deleted on release (a stale one
from a killed run is harmless and reused).

**A killed run is repaired by the next one.** Taking the lock runs ``recover_output_folder``: a leftover new
folder or file is deleted, or, once the exchange happened, retired like an old folder; a leftover old folder
is renamed back when OUT is missing (the swap had not happened: the old set wins) and retired when OUT is
there (the swap happened). Within the main thread SIGINT and SIGTERM are held while folders are swapped,
retired or recovered and delivered right after, so Ctrl-C or a kill lands before the swap (nothing written)
or after it (the complete new set in place: ``output_lock.written``), never in between; SIGKILL is left to
the next run.

**Checks before any work.** ``check_output_folder`` and ``check_output_file`` are the one place that says
"already exists; pass --overwrite", and that the output can be written at all (a path under a regular file,
a read-only or unwritable folder, a name too long for its file system): taking the lock creates the lock
file beside it, which is the probe. Nothing else is left behind: folders the lock had to create for the lock
file are removed again on release when they are empty. A disk that fills up while writing ends in one
sentence ("The disk is full: …") with nothing written.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Sequence

from ..errors import BadRequest, SyncSphereError

SIBLING_MARK = ".syncsphere-"
"""Hidden siblings of an output OUT are named ``.OUT.syncsphere-lock``, ``-new-PID`` and ``-old-PID``."""

_LONG_NAME = 100
"""Longer names (in bytes) are replaced by a hash in the siblings' names, so they fit where the name fits."""


def check_output_folder(out_dir: str, names: Iterable[str], overwrite: bool) -> str:
    """The absolute path of the output folder ``out_dir`` (``~`` expanded), after checking that it can be
    written and that none of the files ``names`` exists in it unless ``overwrite``.

    Takes ``output_lock(out_dir)`` for the check (re-entrant: callers that hold it keep it), which repairs
    what a killed run left and proves the folder's parent writable. Raises BadRequest with one sentence
    ("... is in use by another SyncSphere run", "... cannot be written: ... read-only file system", "... exists
    and is not a folder", "... already exists; pass --overwrite ..."). Leaves nothing behind.
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    with output_lock(out_dir):
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise BadRequest(f"The output path {out_dir} exists and is not a folder.")
        if os.path.ismount(out_dir):
            raise BadRequest(f"The output folder {out_dir} is a mount point; choose a folder inside it.")
        if os.path.isdir(out_dir) and not os.access(out_dir, os.W_OK | os.X_OK):
            raise BadRequest(f"The output folder {out_dir} cannot be written: permission denied.")
        for entry in os.scandir(out_dir) if os.path.isdir(out_dir) else ():
            # The old folder's entries move into the new one, and moving a folder rewrites its "..".
            if entry.is_dir(follow_symlinks=False) and not os.access(entry.path, os.W_OK):
                raise BadRequest(f"The output folder {out_dir} cannot be replaced as a unit: its folder "
                                 f"{entry.name} cannot be written (permission denied).")
        for name in names:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                raise BadRequest(f"{path} is a folder; move it away or choose another --out folder.")
            _refuse_existing(path, overwrite, "another --out folder")
    return out_dir


def check_output_file(path: str, overwrite: bool) -> str:
    """The absolute path of the output file ``path`` (``~`` expanded), after checking that it is not a folder,
    that it can be written, and that it does not exist unless ``overwrite``. Takes ``output_lock(path,
    "file")`` for the check. Raises BadRequest with one sentence. Leaves nothing behind."""
    path = os.path.abspath(os.path.expanduser(path))
    with output_lock(path, "file"):
        if os.path.isdir(path):
            raise BadRequest(f"The output path {path} is a folder; --out names the image file to write.")
        _refuse_existing(path, overwrite, "another --out file")
    return path


def _refuse_existing(path: str, overwrite: bool, instead: str) -> None:
    if os.path.lexists(path) and not overwrite:
        raise BadRequest(f"{path} already exists; pass --overwrite to replace it or choose {instead}.")


def write_files_atomically(out_dir: str, writers: Sequence[tuple[str, Callable[[str], None]]],
                           remove: Sequence[str] = ()) -> dict[str, str]:
    """Write a set of files into the folder ``out_dir`` as one unit: a reader sees the folder's old set or
    the complete new one, never a mix (the module's docstring says how).

    ``writers``: (file name, write) pairs, ``write(path)`` writing the whole file at ``path``. ``remove``:
    names of files an earlier run may have left that this set replaces by nothing. The set is the writers'
    names and ``remove``; other entries of ``out_dir`` stay. Creates ``out_dir`` if needed. Holds
    ``output_lock(out_dir)`` meanwhile (BadRequest when another run holds it) and sets its ``written`` once
    the new set is in place. On any failure before that nothing has changed and the hidden folder is gone;
    an OSError becomes a SyncSphereError with one sentence ("The disk is full: …"). Returns {file name: path}.
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    names = [name for name, _ in writers]
    with output_lock(out_dir) as lock:
        target = lock.target
        new = _sibling(target, f"new-{os.getpid()}")
        try:
            lock.record_set([*names, *remove])
            os.mkdir(new)
            for name, write in writers:
                write(os.path.join(new, name))
            with _signals_held():
                _swap_in(new, target, lock)
        except BaseException as error:
            full = not lock.written and _disk_full(new)  # before removing what the writers left
            if not lock.written:
                _remove_entry(new)
            if isinstance(error, OSError) or (full and isinstance(error, Exception)):
                raise _write_error(out_dir, error, lock.written, full) from error
            raise
    return {name: os.path.join(out_dir, name) for name in names}


def write_file_atomically(path: str, write: Callable[[str], None]) -> str:
    """Write one file at ``path`` so that it is never seen half-written: ``write(partial)`` writes it whole
    beside ``path`` (``.NAME.syncsphere-new-PID``), then it is renamed onto ``path``, replacing a file of that
    name. Holds ``output_lock(path, "file")`` meanwhile and sets its ``written`` once the file is in place. On
    any failure the partial file is removed; an OSError becomes a SyncSphereError with one sentence. Returns
    the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    with output_lock(path, "file") as lock:
        partial = _sibling(lock.target, f"new-{os.getpid()}")
        try:
            write(partial)
            with _signals_held():
                os.replace(partial, lock.target)
                lock.written = True
        except BaseException as error:
            full = not lock.written and _disk_full(partial)
            _remove_entry(partial)
            if isinstance(error, OSError) or (full and isinstance(error, Exception)):
                raise _write_error(path, error, lock.written, full) from error
            raise
    return path


def _swap_in(new: str, target: str, lock: "output_lock") -> None:
    """Put the complete folder ``new`` in place of ``target`` and retire the old folder (signals held)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        lock.written = True
        return
    if not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), target)
    try:  # the new folder keeps the old one's permissions
        os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
    except OSError:
        pass
    if _exchange(new, target):
        lock.written = True  # ``new`` now holds the old folder
        _retire(new, target, lock.set_names)
        return
    old = _sibling(target, f"old-{os.getpid()}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    lock.written = True
    _retire(old, target, lock.set_names)


def recover_output_folder(out_dir: str, set_names: Iterable[str] | None = None) -> None:
    """Repair what a killed run left beside the output ``out_dir`` (a folder or one file), so that it holds
    a complete set and no hidden leftovers. Call only while holding ``output_lock(out_dir)`` (taking the
    lock calls it).

    ``set_names``: the file names of the set the killed run was swapping in (the lock file records them),
    None when unknown. A leftover ``-old-`` folder is renamed back when ``out_dir`` is missing (the swap had
    not happened, so the old set wins) and retired when ``out_dir`` is there (the swap happened: entries that
    are not ``set_names`` move back into ``out_dir``, the rest is deleted). A leftover ``-new-`` file or folder
    is deleted, or, when it holds the old folder after an exchange, retired the same way (a folder still
    being written holds only set files, which are deleted; with ``out_dir`` missing, one holding other
    entries stays). Unknown ``set_names``: entries missing from
    ``out_dir`` are moved back and the rest stays hidden, never deleted.
    """
    parent, prefix = os.path.dirname(out_dir), _sibling(out_dir, "")
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"(new|old)-\d+")
    leftovers = sorted((match.group(1) != "old", os.path.join(parent, entry))
                       for entry in os.listdir(parent) if (match := pattern.fullmatch(entry)))
    for is_new, path in leftovers:  # old folders first: one may have to become out_dir again
        if not os.path.isdir(path) or os.path.islink(path):
            _remove_entry(path)
        elif os.path.lexists(out_dir):
            _retire(path, out_dir, set_names)
        elif not is_new:
            os.rename(path, out_dir)
        elif set_names is not None and set(os.listdir(path)) <= set(set_names):
            _remove_entry(path)
        # else: an exchanged old folder whose out_dir was deleted since: not ours to delete, left as it is


def _retire(old: str, target: str, set_names: Iterable[str] | None) -> None:
    """Delete the set's files in the hidden folder ``old`` (none when ``set_names`` is None: unknown), move
    its other entries back into ``target`` unless a name there has them, and remove ``old`` once empty.
    Never replaces or deletes anything else."""
    set_names = None if set_names is None else set(set_names)
    for entry in os.listdir(old):
        source, destination = os.path.join(old, entry), os.path.join(target, entry)
        if set_names is not None and entry in set_names:
            _remove_entry(source)
        elif not os.path.lexists(destination):
            os.rename(source, destination)
    if not os.listdir(old):
        os.rmdir(old)


def _remove_entry(path: str) -> None:
    """Delete the file, link or folder tree at ``path``; a missing one is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _sibling(target: str, role: str) -> str:
    """The hidden sibling ``.NAME.syncsphere-ROLE`` of ``target`` (a hash for NAME when it is long)."""
    parent, name = os.path.split(target)
    if len(os.fsencode(name)) > _LONG_NAME:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.path.join(parent, f".{name}{SIBLING_MARK}{role}")


def _write_error(out: str, error: Exception, written: bool, full: bool) -> SyncSphereError:
    """One sentence for an error while writing ``out`` (an OSError, or any error with the disk ``full``),
    saying what is on disk."""
    reason = getattr(error, "strerror", None) or error
    if written:  # only retiring the old folder can fail after the swap
        return SyncSphereError(f"{out} holds the complete new set, but tidying up the old one failed "
                               f"({reason}); the next run into it finishes that.")
    if getattr(error, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or full:
        reason = reason if isinstance(error, OSError) else os.strerror(errno.ENOSPC)
        return SyncSphereError(f"The disk is full ({reason}): nothing was written into {out}.")
    return SyncSphereError(f"Could not write the outputs into {out} ({reason}); nothing was written.")


_NEARLY_FULL = 1 << 20
"""Bytes: a writer that fails with less than this left beside the outputs failed for want of space."""


def _disk_full(path: str) -> bool:
    """Whether the file system holding ``path`` has (almost) no space left. Some writers report a full disk
    as another error than OSError(ENOSPC) (OpenEXR: a RuntimeError), so the disk itself is asked."""
    try:
        return shutil.disk_usage(path if os.path.exists(path) else os.path.dirname(path)).free < _NEARLY_FULL
    except OSError:
        return False


RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, or glibc before 2.28)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: str, b: str) -> bool:
    """Swap the entries ``a`` and ``b`` in one atomic step; False where the system or the file system
    cannot (then nothing happened)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


class _signals_held:
    """Within the main thread, SIGINT and SIGTERM that arrive inside the block are delivered right after it
    (to the handlers that were in place), so a swap of folders is never left half done by them."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __enter__(self):
        self.previous, self.received = {}, []
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, lambda number, frame: self.received.append(number))
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if self.received:
            signal.raise_signal(self.received[0])
        return False


_HELD: dict[str, "output_lock"] = {}
"""The locks this process holds, by their output's real path."""
_HELD_GUARD = threading.Lock()


class output_lock:
    """``with output_lock(out) as lock:`` holds the advisory lock of the output ``out`` (a folder, or with
    ``kind`` "file" one file) while a run checks and writes it; the module's docstring says why and how.

    Entering creates missing parent folders and the lock file ``.NAME.syncsphere-lock`` beside ``out`` (the
    probe that ``out`` can be written), refuses at once when another run holds it, and repairs what a killed
    run left (``recover_output_folder``). Entering again in the same thread nests and gives the outer lock;
    another thread is refused like another process. Leaving the outermost deletes the lock file and the
    parent folders it created when they are empty. An empty ``out``, or anything but a path, locks nothing
    (the request's validation refuses it). Raises BadRequest with one sentence. ``written``: True once a
    writer has put the new files in place (the truth an interrupted run reports); ``target``: the real path
    of ``out``, once entered.
    """

    def __init__(self, out: str | None, kind: str = "folder"):
        self.out = os.path.abspath(os.path.expanduser(out)) if isinstance(out, (str, os.PathLike)) and out else None
        self.kind = kind
        self.target = None  # set on entering
        self.written = False
        self.set_names = None
        self._depth, self._fd, self._created, self._owner, self._thread = 0, None, [], self, None

    def __enter__(self) -> "output_lock":
        if self.out is None:
            return self
        try:
            self.target = os.path.realpath(self.out)
        except ValueError:  # a NUL byte
            raise BadRequest(f"The output path {self.out!r} is not a valid path.") from None
        with _HELD_GUARD:
            holder = _HELD.get(self.target)
            if holder is None:
                self._thread = threading.get_ident()
                _HELD[self.target] = self
            elif holder._thread == threading.get_ident():
                holder._depth += 1
                self._owner = holder
                return holder
        if holder is not None:
            raise BadRequest(self._busy(os.getpid()))
        try:
            self._acquire()
        except BaseException:
            with _HELD_GUARD:
                del _HELD[self.target]
            raise
        self._depth = 1
        return self

    def __exit__(self, *exc) -> bool:
        owner = self._owner
        if self.target is None or owner._depth == 0:
            return False
        owner._depth -= 1
        if owner._depth == 0:
            with _HELD_GUARD:
                del _HELD[owner.target]
            owner._release()
        return False

    def record_set(self, names: Iterable[str]) -> None:
        """Record in the lock file the names of the set about to be swapped in, for the recovery of a run
        killed meanwhile (``recover_output_folder``)."""
        self.set_names = sorted(set(names))
        _write_lock_file(self._owner._fd, {"pid": os.getpid(), "set": self.set_names})

    def _acquire(self) -> None:
        """Create the parents and the lock file, lock it, and recover; BadRequest when that fails."""
        _check_name_lengths(self.out, self.target)
        self._created = _make_parents(self.out, os.path.dirname(self.target))
        lock_path = _sibling(self.target, "lock")
        try:
            self._fd, previous = _lock_file(lock_path)
        except OSError as error:
            self._remove_created()
            raise BadRequest(_creation_problem(self.out, self.kind, error)) from None
        except _Busy as busy:
            self._remove_created()
            raise BadRequest(self._busy(busy.pid)) from None
        try:
            # The killed holder's set stays recorded until its leftovers are repaired: a kill meanwhile loses nothing.
            _write_lock_file(self._fd, {"pid": os.getpid(), "set": previous.get("set")})
            with _signals_held():
                recover_output_folder(self.target, previous.get("set"))
            _write_lock_file(self._fd, {"pid": os.getpid()})
        except BaseException as error:
            self._release()
            if isinstance(error, OSError):
                raise BadRequest(_creation_problem(self.out, self.kind, error)) from None
            raise

    def _release(self) -> None:
        """Delete the lock file (while still holding it, so nobody locks a deleted file), unlock, close."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _unlock_file(_sibling(self.target, "lock"), fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:  # not empty any more (the job's outputs are in it): it stays
                break
        self._created = []

    def _busy(self, pid: int | None) -> str:
        holder = f" (pid {pid})" if pid else ""
        return (f"The output {self.kind} {self.out} is in use by another SyncSphere run{holder}; wait for it or "
                "choose another --out.")


class _Busy(Exception):
    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid


def _lock_file(lock_path: str) -> tuple[int, dict]:
    """Open, create and lock ``lock_path``; (its descriptor, what a killed holder recorded in it). Raises
    _Busy with the holder's pid when another process holds it, OSError when it cannot be created."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                raise _Busy(_read_lock_file(fd).get("pid"))
            opened = os.fstat(fd)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return fd, _read_lock_file(fd)
        os.close(fd)  # its holder deleted it on release before we locked it: lock the new one


def _read_lock_file(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 1 << 16) or b"{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_lock_file(fd: int, record: dict) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())


if os.name == "nt":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 1 << 20, os.SEEK_SET)  # a byte past the record, so others can still read the pid
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock_file(lock_path: str, fd: int) -> None:
        os.close(fd)  # Windows deletes no open file: close first, and leave it when another run has it open
        try:
            os.remove(lock_path)
        except OSError:
            pass
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock_file(lock_path: str, fd: int) -> None:
        try:
            os.remove(lock_path)
        except OSError:
            pass
        os.close(fd)


def _make_parents(out: str, parent: str) -> list[str]:
    """Create the missing folders down to ``parent``; the ones created, outermost first. BadRequest when a
    path component is a file or a folder cannot be created."""
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadRequest(f"The output {out} cannot be created: {parent} is a file, not a folder.")
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except OSError as error:
            for made in reversed(created):
                os.rmdir(made)
            raise BadRequest(_creation_problem(out, "folder", error)) from None
        created.append(folder)
    return created


def _check_name_lengths(out: str, target: str) -> None:
    """BadRequest when a name in ``target`` that does not exist yet is longer than its file system allows."""
    missing = []
    while not os.path.lexists(target) and os.path.dirname(target) != target:
        missing.append(os.path.basename(target))
        target = os.path.dirname(target)
    try:
        limit = os.pathconf(target, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    except (OSError, ValueError):
        limit = 255
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise BadRequest(f"The output {out} cannot be created: the name {name[:40]}… is "
                             f"{len(os.fsencode(name))} bytes long, and its file system allows {limit}.")


def _creation_problem(out: str, kind: str, error: OSError) -> str:
    """The one sentence for an OSError while creating the output ``out``'s lock file or parents."""
    where = os.path.dirname(error.filename) if error.filename else os.path.dirname(out)
    reasons = {
        errno.EROFS: f"{where} is on a read-only file system",
        errno.EACCES: f"permission denied in {where}",
        errno.EPERM: f"permission denied in {where}",
        errno.ENOSPC: f"the disk holding {where} is full",
        errno.ENOTDIR: f"a part of {where} is a file, not a folder",
        errno.ENAMETOOLONG: "its path is too long",
    }
    reason = reasons.get(error.errno, error.strerror or str(error))
    return f"The output {kind} {out} cannot be written: {reason}."
