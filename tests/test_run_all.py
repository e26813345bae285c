"""tests/run_all.py, the README's test command: every stage runs and is reported, and a failure anywhere
fails the whole, at the end. Checked on fake stages (small Python commands), not the real ones."""

import io
import re
import sys
from pathlib import Path

import run_all
from run_all import Stage

REPO = Path(__file__).resolve().parents[1]


def python(code: str) -> tuple[str, ...]:
    """A command that runs ``code`` in this Python."""
    return (sys.executable, "-c", code)


def write(name: str) -> tuple[str, ...]:
    """A command that creates the file ``name`` in the working folder, so a test sees that it ran."""
    return python(f"open({name!r}, 'w').close()")


def test_a_failing_stage_does_not_stop_the_later_ones_and_fails_the_run_at_the_end(tmp_path):
    stages = (
        Stage("install one", (write("installed-one"),)),
        Stage("suite one", (python("import sys; sys.exit(3)"), write("never")), needs=("install one",)),
        Stage("install two", (write("installed-two"),)),
        Stage("suite two", (write("ran-two"),), needs=("install two",), env={"SYNCSPHERE_FAKE": "1"}),
        Stage("install three", (python("raise SystemExit(1)"),)),
        Stage("needs three", (write("never-three"),), needs=("install one", "install three")),
        Stage("cannot start", ((str(tmp_path / "no-such-program"),),)),
    )
    out = io.StringIO()
    code = run_all.main(stages, tmp_path, out)
    report = out.getvalue()
    assert code == 1
    # The stages after the failure ran; a failed stage stops at its failing command.
    assert {path.name for path in tmp_path.iterdir()} == {"installed-one", "installed-two", "ran-two"}
    summary = report.split("=== summary\n", 1)[1].splitlines()
    statuses = [line.split()[0] for line in summary[:-1]]
    assert statuses == ["PASSED", "FAILED", "PASSED", "PASSED", "FAILED", "SKIPPED", "FAILED"]
    assert all(stage.name in line for stage, line in zip(stages, summary))
    assert "exit code 3" in summary[1] and "needs install three, which did not pass" in summary[5]
    assert "could not start" in summary[6]
    assert summary[-1] == "4 of 7 stages did not pass."
    assert "+ SYNCSPHERE_FAKE=1 " in report  # the environment a stage adds is shown with its command


def test_all_stages_passing_exits_0(tmp_path):
    out = io.StringIO()
    assert run_all.main((Stage("one", (write("a"),)), Stage("two", (write("b"),), needs=("one",))), tmp_path, out) == 0
    assert out.getvalue().rstrip().endswith("All 2 stages passed.")


def test_the_real_stages_install_both_environments_and_run_every_test_file_named(tmp_path):
    """The stages the README's command runs: both environments installed by the Python running the script, the
    whole suite, and the Blender 4.2 test files, each of which exists."""
    stages = {stage.name: stage for stage in run_all.STAGES}
    commands = [" ".join(command) for stage in run_all.STAGES for command in stage.commands]
    assert any(command.endswith("pip install -r requirements-dev.txt") for command in commands)
    assert any(command.endswith("pip install -r requirements-blender42.txt") for command in commands)
    assert any(command.endswith("-m pytest -q tests") for command in commands)
    for stage in stages.values():
        assert all(need in stages for need in stage.needs), stage.name
    named = {word for command in commands for word in command.split() if word.startswith("tests/")}
    assert named and all((REPO / name).is_file() for name in named), named


def test_the_readme_and_ci_run_it():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert blocks[1].strip() == "python3.11 tests/run_all.py"  # CI (.ci/run) runs the second block
    assert "backend generate" in blocks[0]
