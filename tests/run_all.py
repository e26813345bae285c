"""Install everything and run every test stage, then report each: ``python3.11 tests/run_all.py``.

The README's test command and CI (.ci/run) run this. Each stage runs even when an earlier one failed, so a
failure in the main suite does not hide the Blender 4.2 results; a stage that needs an environment whose
installation failed is skipped and reported as such. The exit code is 0 only when every stage passed.

Stages (from the repository root, with the Python that runs this script making the environments):

1. the main environment, ``.venv``: the backend, pytest and headless Blender 5.0 (``requirements-dev.txt``);
2. every test in it;
3. the Blender 4.2 LTS environment, ``.venv-blender42`` (``requirements-blender42.txt``);
4. the extension's tests that run on bpy alone, in Blender 4.2;
5. the end-to-end Blender tests with Blender 4.2 driving the backend of ``.venv``.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``commands`` (argument lists) run in order until one fails, in the repository root, with
    ``env`` added to the environment; it runs only when the stages named in ``needs`` passed."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    needs: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a stage ended: ``status`` "passed", "failed" or "skipped"; ``detail`` says why, for the summary."""

    stage: Stage
    status: str
    detail: str
    seconds: float = 0.0


MAIN_ENV, BLENDER42_ENV = ".venv/bin/python", ".venv-blender42/bin/python"
# The extension's tests that need only bpy (no torch), run again on the oldest Blender the manifest claims.
BLENDER42_TESTS = ("tests/test_extension.py", "tests/test_blender_world.py", "tests/test_blender_material.py",
                   "tests/test_blender_panels.py", "tests/test_backend_setup.py")
# The end-to-end tests: Blender 4.2 (SYNCSPHERE_TEST_BLENDER_PYTHON) drives the backend of the main environment.
BLENDER42_END_TO_END_TESTS = ("tests/test_blender_generate.py", "tests/test_blender_history_and_modes.py",
                              "tests/test_blender_export.py", "tests/test_blender_lighting.py",
                              "tests/test_blender_models.py", "tests/test_blender_first_run.py",
                              "tests/test_blender_artist_path.py", "tests/test_blender_preview_and_bake.py")

STAGES = (
    Stage("install .venv (the backend, pytest, Blender 5.0)",
          ((sys.executable, "-m", "venv", ".venv"), (".venv/bin/pip", "install", "-r", "requirements-dev.txt"))),
    Stage("every test, Blender 5.0", ((MAIN_ENV, "-m", "pytest", "-q", "tests"),),
          needs=("install .venv (the backend, pytest, Blender 5.0)",)),
    Stage("install .venv-blender42 (Blender 4.2 LTS)",
          ((sys.executable, "-m", "venv", ".venv-blender42"),
           (".venv-blender42/bin/pip", "install", "-r", "requirements-blender42.txt"))),
    Stage("extension tests, Blender 4.2", ((BLENDER42_ENV, "-m", "pytest", "-q", *BLENDER42_TESTS),),
          needs=("install .venv-blender42 (Blender 4.2 LTS)",)),
    Stage("end-to-end Blender tests, Blender 4.2", ((MAIN_ENV, "-m", "pytest", "-q", *BLENDER42_END_TO_END_TESTS),),
          needs=("install .venv (the backend, pytest, Blender 5.0)", "install .venv-blender42 (Blender 4.2 LTS)"),
          env={"SYNCSPHERE_TEST_BLENDER_PYTHON": BLENDER42_ENV}),
)


def run_stage(stage: Stage, cwd: Path, out) -> Outcome:
    """Run ``stage``'s commands in ``cwd`` until one fails, their output going where this script's goes.
    Returns its Outcome (a command that cannot start fails the stage)."""
    started = time.monotonic()
    env = {**os.environ, **stage.env}
    for command in stage.commands:
        shown = " ".join(f"{name}={value}" for name, value in stage.env.items()) + (" " if stage.env else "")
        print(f"+ {shown}{' '.join(command)}", file=out, flush=True)
        try:
            code = subprocess.run(command, cwd=cwd, env=env).returncode
        except OSError as error:
            return Outcome(stage, "failed", f"{command[0]} could not start ({error})", time.monotonic() - started)
        if code != 0:
            return Outcome(stage, "failed", f"exit code {code} from {' '.join(command[:4])}", time.monotonic() - started)
    return Outcome(stage, "passed", "", time.monotonic() - started)


def run_stages(stages=STAGES, cwd: Path = REPO, out=sys.stdout) -> list[Outcome]:
    """Run every stage in order, each whose ``needs`` passed, and return their outcomes."""
    outcomes: dict[str, Outcome] = {}
    for number, stage in enumerate(stages, 1):
        print(f"\n=== stage {number}/{len(stages)}: {stage.name}", file=out, flush=True)
        missing = [need for need in stage.needs if outcomes.get(need) is None or outcomes[need].status != "passed"]
        if missing:
            outcome = Outcome(stage, "skipped", "needs " + " and ".join(missing) + ", which did not pass")
            print(f"skipped: {outcome.detail}", file=out, flush=True)
        else:
            outcome = run_stage(stage, cwd, out)
            if outcome.status != "passed":
                print(f"failed: {outcome.detail}; going on with the next stage", file=out, flush=True)
        outcomes[stage.name] = outcome
    return list(outcomes.values())


def summary(outcomes: list[Outcome]) -> str:
    """Every stage's outcome, one line each, and a last line saying whether all passed."""
    lines = ["", "=== summary"]
    for outcome in outcomes:
        took = f" ({outcome.seconds:.0f} s)" if outcome.status != "skipped" else ""
        detail = f": {outcome.detail}" if outcome.detail else ""
        lines.append(f"{outcome.status.upper():8} {outcome.stage.name}{took}{detail}")
    bad = [outcome for outcome in outcomes if outcome.status != "passed"]
    lines.append(f"{len(bad)} of {len(outcomes)} stages did not pass." if bad else f"All {len(outcomes)} stages passed.")
    return "\n".join(lines)


def main(stages=STAGES, cwd: Path = REPO, out=sys.stdout) -> int:
    """Run every stage and print the summary; returns 0 when every stage passed, else 1."""
    outcomes = run_stages(stages, cwd, out)
    print(summary(outcomes), file=out, flush=True)
    return 0 if all(outcome.status == "passed" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
