"""The documents stand alone and hold: what they cite exists, and the README's command list is the CLI's.

Read from the files as a newcomer gets them in a fresh clone (git's tracked and new, not ignored, files)."""

import argparse
import re
import subprocess
from pathlib import Path

from backend.app.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yml", ".yaml", ""}


def repository_texts():
    """{relative path: text} of the repository's text files: tracked or new, never ignored (no .venv, outputs)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    texts = {}
    for name in filter(None, listed):
        path = REPO / name
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            try:
                texts[name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                pass  # not text
    return texts


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings: lower case, punctuation dropped, spaces as '-'."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if line.startswith("#")}


def test_nothing_cites_a_design_document_that_is_not_in_the_repository():
    """The design document the code once cited by section number is not shipped; its rules are in
    docs/conventions.md, cited by anchor."""
    missing = re.compile("|".join(("DESIGN" + r" ?§", r"design" + r" section", r"\bsection [0-9]")), re.IGNORECASE)
    cited = [f"{name}:{text[:match.start()].count(chr(10)) + 1}: {match.group(0)}"
             for name, text in repository_texts().items() for match in missing.finditer(text)]
    assert not cited, "\n".join(cited)


def test_every_cited_document_and_section_exists():
    """Every ``docs/NAME.md`` that a file names exists, and every ``docs/NAME.md#anchor`` is one of its headings
    (tests may name documents they make, as test_extension.py's build clutter)."""
    texts = repository_texts()
    problems = []
    for name, text in texts.items():
        for match in re.finditer(r"docs/([a-z0-9_-]+\.md)(?:#([a-z0-9_-]+))?", text):
            document, anchor = f"docs/{match.group(1)}", match.group(2)
            if document not in texts and not name.startswith("tests/"):
                problems.append(f"{name} cites {document}, which does not exist")
            elif anchor and anchor not in heading_anchors(texts[document]):
                problems.append(f"{name} cites {document}#{anchor}, which is not one of its headings")
    assert not problems, "\n".join(sorted(set(problems)))


def cli_commands() -> dict[str, set[str]]:
    """Every command of ``python -m backend`` with the sub-commands it has (empty for most)."""
    def choices(parser):
        actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        return actions[0].choices if actions else {}

    return {name: set(choices(parser)) for name, parser in choices(build_parser()).items()}


def readme_command_list() -> str:
    """The fenced block of the README's "The command line" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The command line", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readmes_command_list_has_every_command_of_the_cli():
    listed = readme_command_list()
    shown = {match.group(1): match.group(2) for match in re.finditer(r"^python -m backend (\w+)(.*)$", listed, re.MULTILINE)}
    commands = cli_commands()
    assert set(shown) == set(commands), f"listed {sorted(shown)}, the CLI has {sorted(commands)}"
    for command, subcommands in commands.items():
        for subcommand in subcommands:  # e.g. models list|download ID|remove ID
            assert re.search(rf"(?<![\w-]){subcommand}(?![\w-])", shown[command]), (command, subcommand)
