"""Build the installable Blender extension zip: ``python tools/build_extension.py [--output-dir dist]``.

Blender's own extension tool builds it from this repository (the manifest's ``[build]`` rules decide what goes
in: the add-on and ``backend/``, no tests, docs, tools or dot-folders) and then validates the zip, as
extensions.blender.org would. The tool is taken from, in order:

- ``--blender PATH``: that Blender executable (4.2 or newer), run as ``blender --command extension build``;
- the ``bpy`` package of the Python running this script (``requirements-dev.txt`` installs it), which ships
  the same tool as ``blender_ext.py``;
- ``blender`` on ``PATH``.

Standard library only, so any Python 3.11 runs it. Prints the zip's path and how to install it; errors are one
sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root, which is the extension's source (docs/conventions.md#extension)."""


class BuildError(Exception):
    """The zip could not be built or is not valid; ``str()`` is one sentence for the user."""


def bundled_extension_tool() -> Path | None:
    """Blender's ``blender_ext.py`` in the ``bpy`` package this Python has (``bpy/<version>/scripts/addons_core/
    bl_pkg/cli/``), found without importing bpy (which starts Blender); None without bpy."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    # The folder is named after Blender's version (5.0/, 4.2/...); the newest one if there are several.
    found = sorted(folder.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    return found[-1] if found else None


def extension_tool(blender: str | None = None) -> list[str]:
    """The command that runs Blender's extension tool (its sub-command and arguments follow it): ``blender``
    given, else the tool in this Python's bpy, else ``blender`` on PATH. Raises BuildError when there is none."""
    if blender:
        if shutil.which(blender) is None:
            raise BuildError(f"{blender} is not a Blender executable that can be run; pass the path of Blender 4.2 "
                             "or newer with --blender.")
        return [blender, "--factory-startup", "--command", "extension"]
    tool = bundled_extension_tool()
    if tool is not None:
        return [sys.executable, str(tool)]
    on_path = shutil.which("blender")
    if on_path is not None:
        return [on_path, "--factory-startup", "--command", "extension"]
    raise BuildError("Blender's extension tool was not found: run this with a Python that has bpy (.venv/bin/python "
                     "after `.venv/bin/pip install -r requirements-dev.txt`), put Blender 4.2 or newer on PATH, or "
                     "pass its path with --blender.")


def zip_name(source: Path) -> str:
    """``{id}-{version}.zip`` of the extension in ``source``, as Blender names it."""
    manifest = tomllib.loads((source / "blender_manifest.toml").read_text(encoding="utf-8"))
    return f"{manifest['id']}-{manifest['version']}.zip"


def build_extension(output_dir: Path, source: Path = REPO, blender: str | None = None) -> Path:
    """Build the extension in ``source`` into ``output_dir`` (created; a zip of the same name is replaced) and
    validate it. Returns the zip's path; raises BuildError with the tool's last words when either step fails."""
    tool = extension_tool(blender)
    output_dir.mkdir(parents=True, exist_ok=True)
    archive = output_dir / zip_name(source)
    _run(tool + ["build", "--source-dir", str(source), "--output-filepath", str(archive)], "build")
    _run(tool + ["validate", str(archive)], "validate")
    return archive


def _run(command: list[str], step: str) -> None:
    """Run one step of Blender's tool; raises BuildError naming the step and the tool's last line of output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        raise BuildError(f"Blender's extension tool could not {step} the extension"
                         + (f": {lines[-1]}" if lines else f" (exit code {result.returncode})."))


def main(argv: list[str] | None = None) -> int:
    """Build and validate the zip, then say where it is and how to install it. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python tools/build_extension.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "dist", help="where the zip goes (default dist/)")
    parser.add_argument("--source-dir", type=Path, default=REPO, help="the extension's source (default: this repository)")
    parser.add_argument("--blender", help="a Blender 4.2+ executable whose extension tool builds the zip")
    args = parser.parse_args(argv)
    try:
        archive = build_extension(args.output_dir.resolve(), args.source_dir.resolve(), args.blender)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"built and validated {archive}\n"
          "Install it in Blender 4.2 or newer: Edit > Preferences > Get Extensions, the drop-down menu at the top "
          "right > Install from Disk..., and pick the zip (or drag the zip into Blender's window).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
