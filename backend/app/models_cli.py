"""``python -m backend models list | download ID | remove ID``: the command line of backend/engine/model_manager.py.

``list`` prints a table (or ``--json``: a JSON array) on stdout; ``download`` draws a progress bar on stderr,
or with ``--json-progress`` prints protocol ``progress`` events (stage ``downloading``; ``step`` and
``total`` count bytes) then a ``done`` or ``error`` event on stdout; ``remove`` says what it freed on stderr.
Errors are one sentence on stderr prefixed ``error:`` with exit code 2 (130 for Ctrl-C), as elsewhere in
the CLI.

A hub id never starts with '-', so ``download``/``remove`` read a word that does as an option: ``--help``
shows the help, an unknown one is named as such (not "ID is required"). A program that passes an id it was
given should put it after ``--`` (``models download --json-progress -- ID``): then an id such as ``--help``
is refused in one sentence instead of being obeyed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..errors import SyncSphereError
from .command_errors import one_sentence_errors


def add_models_command(subparsers) -> argparse.ArgumentParser:
    """Add ``models`` with its ``list``, ``download`` and ``remove`` sub-commands to ``subparsers`` (the
    result of ``add_subparsers``); returns the ``models`` parser. ``run_models_command`` runs the result."""
    models = subparsers.add_parser(
        "models", help="list, download or remove Stable Diffusion models",
        description="Manage models: those in the Hugging Face cache and in local model folders.",
    )
    actions = models.add_subparsers(dest="models_command", required=True, metavar="{list,download,remove}",
                                    parser_class=_models_parser_class(type(models)))
    listing = actions.add_parser(
        "list", help="list installed models with size, family and state",
        description="List the models in the Hugging Face cache and in --folder: id or path, size on disk, family "
        "(SD1, SD2, SDXL, LCM, Turbo, read from the configs) and whether every file the engine loads is there.",
    )
    listing.add_argument("--folder", action="append", default=[], metavar="DIR",
                         help="also list the diffusers folders and .safetensors checkpoints in DIR (repeatable)")
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    download = actions.add_parser(
        "download", takes_hub_id=True, help="download a hub model: only the files the engine loads",
        description="Download a hub model into the Hugging Face cache: model_index.json, configs, tokenizer files "
        "and one safetensors variant per component (never .bin/.ckpt). Running it again after an "
        "interruption resumes: finished files are kept.",
    )
    download.add_argument("model_id", metavar="ID", help="a hub id, like stabilityai/stable-diffusion-2-base")
    download.add_argument("--fp16", action="store_true",
                          help="fetch the half-precision weights (*.fp16.safetensors) where the repo has them")
    download.add_argument("--revision", help="a branch, tag or commit (default main)")
    download.add_argument("--json-progress", action="store_true",
                          help="print protocol progress events (stage downloading, bytes) and a done or error "
                          "event on stdout instead of a progress bar")

    remove = actions.add_parser(
        "remove", takes_hub_id=True, help="delete a model from the Hugging Face cache",
        description="Delete a hub model's Hugging Face cache entry and say how much space it freed. Folders and "
        "files you pointed at are never deleted.",
    )
    remove.add_argument("model_id", metavar="ID", help="the hub id of a cached model")
    return models


def _models_parser_class(base: type) -> type:
    """The parser class of the ``models`` sub-commands: ``base`` (the CLI's parser, which words argparse's
    errors), whose ``takes_hub_id`` commands name an unknown option given where the hub id belongs rather
    than say that the id is missing. A hub id never starts with '-', so such a word was never meant as one;
    ``-h``/``--help`` still show the help, and ``--`` passes anything after it as the id (which the command
    then refuses in one sentence: ``model_manager._check_hub_id``)."""

    class ModelsParser(base):
        def __init__(self, *args, takes_hub_id: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.takes_hub_id = takes_hub_id
            self.given: list[str] = []

        def parse_known_args(self, args=None, namespace=None):
            """argparse's, remembering the words ``args`` for ``error``."""
            self.given = list(sys.argv[1:] if args is None else args)
            return super().parse_known_args(args, namespace)

        def error(self, message):
            """Exit 2 with ``message`` (one sentence), or, when only unknown options stand where the hub id
            belongs, with one that names the first."""
            stray = [word for word in self.given if word.startswith("-") and word != "-" and not self._is_option(word)]
            if self.takes_hub_id and stray and "--" not in self.given \
                    and all(word.startswith("-") for word in self.given):
                message = (f"{stray[0]} is not an option of {self.prog}, and a hub id never starts with '-' "
                           "(--help lists the options)")
            super().error(message)

        def _is_option(self, word: str) -> bool:
            name = word.split("=", 1)[0]
            return any(option.startswith(name) for option in self._option_string_actions)  # argparse's abbreviations

    return ModelsParser


def run_models_command(args: argparse.Namespace) -> int:
    """Run a parsed ``models`` command; returns the exit code (0, 2 bad input or model not found, 130
    interrupted)."""
    if args.models_command == "download":
        return _download(args, one_sentence_errors)
    if args.models_command == "remove":
        return one_sentence_errors(lambda: _remove(args), "Interrupted; the cache entry may be partly removed.")
    return one_sentence_errors(lambda: _list(args), "Interrupted.")


def _list(args: argparse.Namespace) -> int:
    from ..engine.model_manager import list_models

    models = list_models(model_folders=args.folder)
    if args.json:
        print(json.dumps([model.to_dict() for model in models], indent=2))
    else:
        print(format_table(models))
    return 0


def format_table(models) -> str:
    """The ``list`` table: model, size, family, state (``partial: what is missing``)."""
    from ..engine.model_manager import human_size

    if not models:
        return "No models in the Hugging Face cache or the given folders."
    rows = [("MODEL", "SIZE", "FAMILY", "STATE")]
    for model in models:
        state = "complete" if model.complete else "partial: missing " + ", ".join(model.missing)
        if model.variant:
            state += f" ({model.variant})"
        rows.append((model.id, human_size(model.size), model.family or "?", state))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}" for row in rows
    )


def _remove(args: argparse.Namespace) -> int:
    from ..engine.model_manager import human_size, remove_model

    freed = remove_model(args.model_id)
    print(f"removed {args.model_id} from the Hugging Face cache, freeing {human_size(freed)}", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace, one_sentence_errors) -> int:
    from .. import protocol
    from ..engine.model_manager import download_model, human_size

    events = sys.stdout if args.json_progress else None

    def work() -> int:
        try:
            # With --json-progress stdout carries protocol lines only: whatever a library prints goes to stderr.
            with contextlib.redirect_stdout(sys.stderr if events else sys.stdout), \
                    DownloadPrinter(args.model_id, events) as printer:
                result = download_model(args.model_id, fp16=args.fp16, progress=printer, revision=args.revision)
        except SyncSphereError as error:
            if events:
                protocol.write_event(events, protocol.error_event(None, error.kind, str(error)))
            raise
        if events:
            protocol.write_event(events, protocol.done_event(None, {"model": result.path}))
        what = f"{len(result.files)} files, {human_size(result.bytes_total)}"
        if result.fetched:
            print(f"downloaded {args.model_id} ({what}) into {result.path}", file=sys.stderr)
        else:
            print(f"{args.model_id} is already complete in the Hugging Face cache ({what}): {result.path}",
                  file=sys.stderr)
        return 0

    return one_sentence_errors(work, "Interrupted; the files fetched so far are kept, so the same download resumes it.")


class DownloadPrinter:
    """The download's progress report (``download_model``'s ``progress``): a tqdm bar of bytes on stderr,
    or protocol ``progress`` events on ``events``, at most one per 1% of the total plus one per file and
    the last."""

    def __init__(self, model_id: str, events=None):
        self.model_id, self.events = model_id, events
        self.bar = None
        self.last: tuple[int, str | None] | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def __call__(self, done: int, total: int, current: str | None) -> bool:
        if self.events is not None:
            self._event(done, total, current)
        else:
            self._draw(done, total, current)
        return False

    def _event(self, done: int, total: int, current: str | None) -> None:
        from ..engine.model_manager import download_progress_event
        from ..protocol import write_event

        if self.last is not None and current == self.last[1] and current is not None \
                and done - self.last[0] < total / 100:
            return
        self.last = (done, current)
        write_event(self.events, download_progress_event(None, self.model_id, done, total, current))

    def _draw(self, done: int, total: int, current: str | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=self.model_id, unit="B", unit_scale=True,
                            file=sys.stderr)
        if current is not None:
            self.bar.set_postfix_str(current, refresh=False)
        self.bar.update(done - self.bar.n)
