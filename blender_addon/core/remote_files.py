"""A remote job's files, received through the protocol into the local job folder (docs/protocol.md, "fetch").

Plain Python (no bpy). The backend on another machine sends each output file as a ``file`` event (its path
there, size and SHA-256) followed by ``chunk`` events (base64). ``ReceivedFiles`` writes them into a hidden
folder beside the local job folder, ``.NAME.syncsphere-fetch-PID``, checks each file's size and SHA-256 when it
is complete, and only when every file has arrived whole puts them into the job folder (one rename of the
folder when it does not exist yet, the usual case; else one rename per file). Anything wrong (a damaged or
short file, a path outside the job's folder, a dropped connection: ``abort``) removes the hidden folder, so
the job folder is never touched by a partial or damaged transfer.
"""

import base64
import binascii
import hashlib
import os
import posixpath
import shutil

FETCH_MARK = ".syncsphere-fetch-"
"""The hidden folder a job's files are received into is ``.NAME.syncsphere-fetch-PID`` beside the job folder."""


class TransferError(Exception):
    """A job's files did not arrive whole; ``str()`` is one sentence for the user."""


class ReceivedFiles:
    """The files of one remote job on their way into the local job folder.

    remote_dir: the job's folder on the backend's machine (a POSIX path: each file's path must be inside it);
    local_dir: the job folder here, which receives the same file names. Feed it the backend's ``file`` and
    ``chunk`` events (``add``), then call ``commit`` on ``fetched``; call ``abort`` when the transfer ends any
    other way (it is safe to call twice). ``files``, ``count`` and ``received_bytes`` tell the progress.
    """

    def __init__(self, remote_dir, local_dir):
        self.remote_dir = posixpath.normpath(remote_dir)
        self.local_dir = os.path.abspath(local_dir)
        parent, name = os.path.split(self.local_dir)
        self.staging = os.path.join(parent, f".{name}{FETCH_MARK}{os.getpid()}")
        self.local_paths = {}  # remote path -> local path, for every file received whole
        self.current = None  # (remote path, relative name, file object, digest, size, sha256) of the open file
        self.files, self.count, self.received_bytes = 0, 0, 0
        self.written = 0  # bytes of the open file so far

    def add(self, event):
        """Take one ``file`` or ``chunk`` event of the transfer. Raises TransferError (and removes what was
        received) when the event does not fit: a path outside the job's folder, a chunk out of order or not
        base64, or a file whose bytes do not match its size and SHA-256."""
        try:
            if event.get("event") == "file":
                self._finish_file()
                self._open_file(event)
            elif event.get("event") == "chunk":
                self._write_chunk(event)
        except TransferError:
            self.abort()
            raise
        except OSError as error:
            self.abort()
            raise TransferError(f"The job's files could not be written into {os.path.dirname(self.local_dir)} "
                                f"({error.strerror or error}); nothing was written to the job folder.") from None

    def commit(self, event, outputs):
        """Check the last file, then put every received file into the job folder; returns the done event's
        ``outputs`` with local paths (``local_outputs``). ``event``: the ``fetched`` event, whose file count and
        bytes must match what arrived; every output must have arrived. Raises TransferError (and removes what was
        received) otherwise, or when the files cannot be moved."""
        try:
            self._finish_file()
            if (event.get("files"), event.get("bytes")) != (self.files, self.received_bytes):
                raise TransferError(f"The backend said it sent {event.get('files')} files of {event.get('bytes')} "
                                    f"bytes, but {self.files} files of {self.received_bytes} bytes arrived; nothing "
                                    "was written to the job folder.")
            local = self.local_outputs(outputs)
            if not os.path.lexists(self.local_dir):
                os.makedirs(os.path.dirname(self.local_dir), exist_ok=True)
                if os.path.isdir(self.staging):
                    os.rename(self.staging, self.local_dir)  # the whole set appears at once
                else:
                    os.makedirs(self.local_dir)
            else:
                for local_path in self.local_paths.values():
                    name = os.path.relpath(local_path, self.local_dir)
                    os.makedirs(os.path.dirname(local_path), exist_ok=True)
                    os.replace(os.path.join(self.staging, name), local_path)
        except TransferError:
            self.abort()
            raise
        except OSError as error:
            self.abort()
            raise TransferError(f"The job's files could not be put into {self.local_dir} ({error.strerror or error}); "
                                "nothing was written to the job folder.") from None
        self.abort()  # only the emptied hidden folder, if any, is left
        return local

    def abort(self):
        """Forget the transfer: close the open file and remove the hidden folder with whatever it holds."""
        if self.current is not None:
            self.current[2].close()
            self.current = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def local_outputs(self, outputs):
        """The done event's ``outputs`` (remote paths, nested for the cube map's faces) with each path replaced by
        where it was received here. Raises TransferError when an output was not received."""
        local = {}
        for key, value in outputs.items():
            if isinstance(value, dict):
                local[key] = self.local_outputs(value)
            elif isinstance(value, str):
                if value not in self.local_paths:
                    raise TransferError(f"The backend did not send the job's file {posixpath.basename(value)}; "
                                        "nothing was written to the job folder.")
                local[key] = self.local_paths[value]
            else:
                local[key] = value
        return local

    def _open_file(self, event):
        path, size, sha256 = event.get("path"), event.get("size"), event.get("sha256")
        if not (isinstance(path, str) and isinstance(size, int) and size >= 0 and isinstance(sha256, str)):
            raise TransferError("The backend sent a file without a path, size or SHA-256; nothing was written to "
                                "the job folder.")
        name = posixpath.relpath(posixpath.normpath(path), self.remote_dir) if posixpath.isabs(path) else ".."
        if name == "." or name.startswith("..") or any(part in ("", ".", "..") for part in name.split("/")):
            raise TransferError(f"The backend sent the file {path}, which is not in the job's folder "
                                f"{self.remote_dir}; nothing was written to the job folder.")
        local_name = os.path.join(*name.split("/"))
        staged = os.path.join(self.staging, local_name)
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        self.current = (path, local_name, open(staged, "wb"), hashlib.sha256(), size, sha256.lower())
        self.count = event.get("count") if isinstance(event.get("count"), int) else self.count
        self.written = 0

    def _write_chunk(self, event):
        if self.current is None or event.get("path") != self.current[0] or event.get("offset") != self.written:
            raise TransferError("The backend sent a piece of a file out of order; nothing was written to the job "
                                "folder.")
        try:
            data = base64.b64decode(event.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise TransferError(f"A piece of {posixpath.basename(self.current[0])} arrived damaged (not base64); "
                                "nothing was written to the job folder.") from None
        self.current[2].write(data)
        self.current[3].update(data)
        self.written += len(data)
        self.received_bytes += len(data)
        if self.written > self.current[4]:
            raise TransferError(f"{posixpath.basename(self.current[0])} arrived longer than the backend said; "
                                "nothing was written to the job folder.")

    def _finish_file(self):
        if self.current is None:
            return
        path, local_name, file, digest, size, sha256 = self.current
        file.close()
        self.current = None
        name = posixpath.basename(path)
        if self.written != size:
            raise TransferError(f"{name} arrived incomplete ({self.written} of {size} bytes); nothing was written to "
                                "the job folder.")
        if digest.hexdigest() != sha256:
            raise TransferError(f"{name} arrived damaged: its SHA-256 does not match the backend's, so the "
                                "connection changed it; nothing was written to the job folder.")
        self.local_paths[path] = os.path.join(self.local_dir, local_name)
        self.files += 1
