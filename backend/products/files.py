"""Writing files so that nobody ever sees them half-written, and refusing to replace a user's files by accident.

Every file is first written in full to a hidden partial file in the output folder and then renamed into place
(a rename within a folder is atomic), so a job that fails or is killed while writing never leaves a
half-written ``panorama.png``. Partial files of a killed run are removed by the next run in that folder.
``write_files_atomically`` does this for any set of files: a job's outputs, the cube map, the HDR lighting and
a perspective view all go through it. ``check_output_folder`` and ``check_output_file`` are the one place that
says "already exists; pass --overwrite". Standard library only.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Sequence

from ..errors import BadRequest

PARTIAL_MARK = ".partial-"


def check_output_folder(out_dir: str, names: Iterable[str], overwrite: bool) -> str:
    """The absolute path of the output folder ``out_dir`` (``~`` expanded), after checking that it is a folder
    or does not exist yet, and that none of the files ``names`` exists in it unless ``overwrite``.

    Raises BadRequest with one sentence ("... exists and is not a folder", "... already exists; pass
    --overwrite ..."). Writes nothing.
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadRequest(f"The output path {out_dir} exists and is not a folder.")
    for name in names:
        _refuse_existing(os.path.join(out_dir, name), overwrite, "another --out folder")
    return out_dir


def check_output_file(path: str, overwrite: bool) -> str:
    """The absolute path of the output file ``path`` (``~`` expanded), after checking that it is not a folder
    and does not exist unless ``overwrite``. Raises BadRequest with one sentence. Writes nothing."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise BadRequest(f"The output path {path} is a folder; --out names the image file to write.")
    _refuse_existing(path, overwrite, "another --out file")
    return path


def _refuse_existing(path: str, overwrite: bool, instead: str) -> None:
    if os.path.exists(path) and not overwrite:
        raise BadRequest(f"{path} already exists; pass --overwrite to replace it or choose {instead}.")


def write_files_atomically(out_dir: str, writers: Sequence[tuple[str, Callable[[str], None]]],
                           remove: Sequence[str] = ()) -> dict[str, str]:
    """Write several files into ``out_dir`` so that none of them is ever seen half-written.

    ``writers``: (file name, write) pairs, ``write(path)`` writing the whole file at ``path``. Each is
    written to a hidden partial file ``.NAME.partial-PID`` first; only when all are written are they
    renamed into place (a rename within a folder is atomic), replacing files of the same name.
    Creates ``out_dir`` if needed and first removes partial files a killed run left there. On any
    failure the partial files are removed, and a folder this call created is removed again, before the
    exception propagates. ``remove``: names of files in ``out_dir`` to delete after the renames (files an
    earlier run wrote that this one replaces by nothing); missing ones are fine. Returns {file name: path}.
    """
    created_folder = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_partial_files(out_dir)
    partial_paths = []
    try:
        for name, write in writers:
            partial = os.path.join(out_dir, f".{name}{PARTIAL_MARK}{os.getpid()}")
            partial_paths.append((partial, os.path.join(out_dir, name)))
            write(partial)
        for partial, final in partial_paths:
            os.replace(partial, final)
        for name in remove:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    except BaseException:
        for partial, _ in partial_paths:
            if os.path.exists(partial):
                os.remove(partial)
        if created_folder and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return {name: os.path.join(out_dir, name) for name, _ in writers}


def remove_partial_files(out_dir: str) -> None:
    """Delete partial files left in ``out_dir`` by a run that was killed while writing."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), f".*{PARTIAL_MARK}*")):
        os.remove(path)
