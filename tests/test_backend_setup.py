"""The "Set Up Backend" feature: a virtual environment with the requirements installed, progress, cancel.

No network: pip installs a wheel this file writes into tmp_path, with ``--no-index``, and the machine's
own pip configuration is ignored (``PIP_CONFIG_FILE`` set to the null device). Each run creates a real
virtual environment with pip in it (a few seconds).
"""

import base64
import hashlib
import os
import subprocess
import sys
import time
import zipfile

import pytest

from syncsphere.blender_addon.core import backend_setup
from test_extension import _PRELUDE, _bpy_dir, _run_python

# Seconds a whole run (venv with pip, one local package) may take on a slow machine.
RUN_TIMEOUT_S = 300


def pip_env():
    """This process's environment without any pip configuration (index, find-links, constraints)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    return env


def make_wheel(folder, version="1.0"):
    """Write the wheel of a one-module package ``syncsphere-test-dep`` into ``folder``; return its path."""
    dist_info = f"syncsphere_test_dep-{version}.dist-info"
    files = {
        "syncsphere_test_dep/__init__.py": "VALUE = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: syncsphere-test-dep\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"syncsphere_test_dep-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def write_requirements(path, *lines):
    """Write a requirements file with ``lines`` (and a comment pip must skip); return its path."""
    path.write_text("# the backend's requirements\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def run_to_end(setup):
    """Start ``setup``, sample its progress until it ends, and return the samples (stage, fraction)."""
    setup.start()
    samples = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not setup.wait(0.05):
        samples.append((setup.stage, setup.fraction, setup.status_text()))
        assert time.monotonic() < deadline, "the setup did not finish"
    return samples


# --- finding interpreters ----------------------------------------------------------------------------


def fake_file(path, executable=True):
    """Create an (empty) file at ``path``, executable by default; return its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    path.chmod(0o755 if executable else 0o644)
    return str(path)


def test_find_base_python_in_blenders_linux_and_macos_layout(tmp_path):
    """<version>/python/bin/python3.11 is preferred over other pythons and the Blender binary."""
    prefix = tmp_path / "4.2" / "python"
    fake_file(prefix / "bin" / "python3.11-config")
    fake_file(prefix / "bin" / "python3.10")
    wanted = fake_file(prefix / "bin" / "python3.11")
    blender = fake_file(tmp_path / "blender")
    assert backend_setup.find_base_python(str(prefix), blender, (3, 11)) == wanted
    # Another version in bin/ is used when the exact one is missing; never a -config script.
    os.remove(wanted)
    assert backend_setup.find_base_python(str(prefix), blender, (3, 11)) == str(prefix / "bin" / "python3.10")


def test_find_base_python_in_windows_layouts(tmp_path):
    """Blender on Windows keeps python.exe in python/bin; a standard install keeps it in the prefix."""
    blender_prefix = tmp_path / "4.2" / "python"
    wanted = fake_file(blender_prefix / "bin" / "python.exe")
    assert backend_setup.find_base_python(str(blender_prefix), str(tmp_path / "blender.exe"), (3, 11)) == wanted
    standard = tmp_path / "Python311"
    wanted = fake_file(standard / "python.exe")
    assert backend_setup.find_base_python(str(standard), str(tmp_path / "blender.exe"), (3, 11)) == wanted


def test_find_base_python_falls_back_to_a_python_executable_only(tmp_path):
    """With nothing under the prefix, the executable is used if it is a Python, never the Blender binary."""
    empty = tmp_path / "empty"
    empty.mkdir()
    python = fake_file(tmp_path / "elsewhere" / "python3")
    assert backend_setup.find_base_python(str(empty), python, (3, 11)) == python
    blender = fake_file(tmp_path / "blender")
    assert backend_setup.find_base_python(str(empty), blender, (3, 11)) is None
    # A file that is not executable is no interpreter.
    fake_file(empty / "bin" / "python3.11", executable=False)
    assert backend_setup.find_base_python(str(empty), blender, (3, 11)) is None


def test_find_base_python_finds_this_interpreter():
    """In the environment running the tests (as in the bpy module) sys.prefix has a usable Python."""
    found = backend_setup.find_base_python(sys.prefix, sys.executable)
    assert found and os.path.isfile(found)


def test_venv_python_per_platform():
    """bin/python on Linux and macOS, Scripts/python.exe on Windows."""
    assert backend_setup.venv_python("env", windows=False) == os.path.join("env", "bin", "python")
    assert backend_setup.venv_python("env", windows=True) == os.path.join("env", "Scripts", "python.exe")


def test_offline_explanation_says_how_to_go_on(tmp_path):
    """One sentence: where to allow online access, or which requirements to install into one's own Python."""
    text = backend_setup.offline_explanation(str(tmp_path))
    assert "Preferences > System > Network > Allow Online Access" in text
    assert "Backend Python" in text and os.path.join(str(tmp_path), "requirements.txt") in text
    assert "\n" not in text


def test_count_requirements_skips_comments_and_options(tmp_path):
    """Only requirement lines count towards the progress estimate."""
    path = write_requirements(tmp_path / "r.txt", "torch==2.14.1  # pinned", "", "--extra-index-url x", "numpy")
    assert backend_setup.count_requirements(path) == 2
    assert backend_setup.count_requirements(str(tmp_path / "missing.txt")) == 0


def test_the_shipped_requirements_file_is_the_default():
    """The operator installs the extension's own requirements.txt."""
    assert os.path.isfile(backend_setup.REQUIREMENTS_FILE)
    assert backend_setup.count_requirements(backend_setup.REQUIREMENTS_FILE) > 3


# --- real runs -----------------------------------------------------------------------------------------


def test_setup_creates_the_environment_and_installs_the_requirements(tmp_path):
    """Success: the package imports in the new environment, progress was reported, the marker exists."""
    wheels = tmp_path / "wheels"
    make_wheel(str(wheels))
    requirements = write_requirements(tmp_path / "requirements.txt", "syncsphere-test-dep==1.0")
    folder = tmp_path / "user" / "backend-env"
    setup = backend_setup.BackendSetup(sys.executable, folder, requirements,
                                      ["--no-index", "--find-links", str(wheels)], env=pip_env())
    assert not setup.finished and setup.fraction == 0.0
    samples = run_to_end(setup)

    assert setup.state == "done", setup.error
    assert setup.python == backend_setup.venv_python(str(folder)) and os.path.isfile(setup.python)
    assert backend_setup.is_ready(str(folder))
    result = subprocess.run([setup.python, "-c", "import syncsphere_test_dep as m; print(m.VALUE)"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "42", result.stderr

    assert setup.stages == [backend_setup.STAGE_VENV, backend_setup.STAGE_PIP]
    assert {stage for stage, _, _ in samples} >= {backend_setup.STAGE_VENV}
    fractions = [fraction for _, fraction, _ in samples] + [setup.fraction]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert setup.collected == 1 and setup.to_install == 1
    assert setup.installed == ["syncsphere-test-dep-1.0"]
    assert "ready" in setup.status_text()
    # The log (next to the folder, by default) holds both commands' output.
    with open(setup.log_path, encoding="utf-8") as log:
        text = log.read()
    assert "-m venv" in text and "Successfully installed syncsphere-test-dep-1.0" in text


def test_a_missing_requirement_fails_with_one_sentence_and_leaves_no_folder(tmp_path):
    """Failure: one readable sentence naming the package and the log; the (empty, pre-made) folder is gone."""
    requirements = write_requirements(tmp_path / "requirements.txt", "syncsphere-missing-dep==1.0")
    folder = tmp_path / "backend-env"
    folder.mkdir()  # Blender's extension_path_user(create=True) makes the folder before the setup runs
    log_path = tmp_path / "logs" / "backend-setup.log"
    setup = backend_setup.BackendSetup(sys.executable, folder, requirements, ["--no-index"],
                                      log_path=log_path, env=pip_env())
    run_to_end(setup)

    assert setup.state == "error" and setup.python is None
    assert "syncsphere-missing-dep" in setup.error and str(log_path) in setup.error
    assert "\n" not in setup.error
    assert not folder.exists()
    assert "No matching distribution" in log_path.read_text(encoding="utf-8")


def test_a_base_python_that_does_not_exist_fails_readably(tmp_path):
    """The base interpreter cannot start: a sentence naming it, and no folder."""
    setup = backend_setup.BackendSetup(str(tmp_path / "no-python"), tmp_path / "env",
                                      write_requirements(tmp_path / "r.txt", "x"), env=pip_env())
    run_to_end(setup)
    assert setup.state == "error" and "no-python" in setup.error and setup.log_path in setup.error
    assert not (tmp_path / "env").exists()


def test_a_folder_with_other_files_is_refused_and_kept(tmp_path):
    """A non-empty folder that is not a virtual environment is never used, nor removed."""
    folder = tmp_path / "env"
    fake_file(folder / "notes.txt", executable=False)
    setup = backend_setup.BackendSetup(sys.executable, folder, write_requirements(tmp_path / "r.txt", "x"),
                                      env=pip_env())
    run_to_end(setup)
    assert setup.state == "error" and "not a virtual environment" in setup.error
    assert (folder / "notes.txt").exists()


def _process_is_gone(pid):
    """True when ``pid`` no longer runs (gone, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_cancel_during_install_kills_pip_and_leaves_no_folder(tmp_path):
    """Cancel while pip builds a package (whose build backend sleeps): nothing is left behind."""
    started = tmp_path / "build-started"
    package = tmp_path / "slow-package"
    package.mkdir()
    # An in-tree PEP 517 build backend with no build requirements, so pip needs no index to reach it.
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "slow_backend"\nbackend-path = ["."]\n\n'
        '[project]\nname = "syncsphere-slow-dep"\nversion = "1.0"\n', encoding="utf-8")
    (package / "slow_backend.py").write_text(
        "import os, time\n\n"
        "def get_requires_for_build_wheel(config_settings=None):\n"
        f"    with open({str(started)!r}, 'w') as file:\n"
        "        file.write(str(os.getpid()))\n"
        "    time.sleep(300)\n"
        "    return []\n", encoding="utf-8")
    requirements = write_requirements(tmp_path / "requirements.txt", str(package))
    folder = tmp_path / "backend-env"
    setup = backend_setup.BackendSetup(sys.executable, folder, requirements, ["--no-index"], env=pip_env())
    setup.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not started.exists() or not started.read_text():
        assert not setup.finished, setup.error
        assert time.monotonic() < deadline, "pip never reached the build backend"
        time.sleep(0.1)
    assert setup.stage == backend_setup.STAGE_PIP and setup.collected == 1

    setup.cancel()
    assert setup.wait(60), "cancel did not end the run"
    assert setup.state == "cancelled" and setup.python is None
    assert not folder.exists()
    if sys.platform.startswith("linux"):
        # The build backend, pip's child, was killed with it (it would otherwise sleep on).
        pid = int(started.read_text())
        deadline = time.monotonic() + 10
        while not _process_is_gone(pid):
            assert time.monotonic() < deadline, "pip's build backend is still running"
            time.sleep(0.1)


def test_a_ready_environment_is_reused_and_loses_its_marker_if_an_update_fails(tmp_path):
    """Running again over a finished environment keeps the folder; a failed run removes only the marker."""
    wheels = tmp_path / "wheels"
    make_wheel(str(wheels))
    folder = tmp_path / "backend-env"
    first = backend_setup.BackendSetup(sys.executable, folder,
                                      write_requirements(tmp_path / "ok.txt", "syncsphere-test-dep"),
                                      ["--no-index", "--find-links", str(wheels)], env=pip_env())
    run_to_end(first)
    assert first.state == "done", first.error
    again = backend_setup.BackendSetup(sys.executable, folder,
                                      write_requirements(tmp_path / "bad.txt", "syncsphere-missing-dep"),
                                      ["--no-index"], env=pip_env())
    run_to_end(again)
    assert again.state == "error"
    assert os.path.isfile(first.python) and not backend_setup.is_ready(str(folder))


# --- the operator in headless Blender ------------------------------------------------------------------

_OPERATOR_PRELUDE = _PRELUDE + """
import os
import bpy
load_addon()
from syncsphere.blender_addon.scene.preferences import SyncSpherePreferences
from syncsphere.operators import setup as setup_operator

bpy.utils.register_class(SyncSpherePreferences)
entry = bpy.context.preferences.addons.new()
entry.module = "syncsphere"
bpy.utils.register_class(setup_operator.SYNCSPHERE_OT_setup_backend)
"""

# Appended to subprocess code: undo the prelude's registration (bpy 4.2 crashes at exit otherwise).
_OPERATOR_EPILOGUE = """
bpy.context.preferences.addons.remove(entry)
bpy.utils.unregister_class(setup_operator.SYNCSPHERE_OT_setup_backend)
bpy.utils.unregister_class(SyncSpherePreferences)
print("ok")
"""


def test_operator_refuses_without_online_access():
    """In the bpy module online access is off: the operator explains how to go on and changes nothing."""
    if _bpy_dir() is None:
        pytest.skip("bpy is not installed")
    _run_python(_OPERATOR_PRELUDE + """
assert bpy.app.online_access is False
prefs = bpy.context.preferences.addons["syncsphere"].preferences
try:
    bpy.ops.syncsphere.setup_backend()
except RuntimeError as exc:  # an ERROR report raises in background mode
    assert "Allow Online Access" in str(exc) and "requirements.txt" in str(exc), exc
else:
    raise AssertionError("the setup should be refused without online access")
assert prefs.python_path == ""
assert setup_operator.running_setup() is None
""" + _OPERATOR_EPILOGUE, timeout=120)


def test_operator_sets_up_and_points_the_preferences_at_the_environment(tmp_path):
    """With online access (patched in: it is read-only) the operator installs and sets Backend Python."""
    if _bpy_dir() is None:
        pytest.skip("bpy is not installed")
    wheels = tmp_path / "wheels"
    make_wheel(str(wheels))
    requirements = write_requirements(tmp_path / "requirements.txt", "syncsphere-test-dep")
    user = tmp_path / "user"
    _run_python(_OPERATOR_PRELUDE + f"""
for key in [key for key in os.environ if key.startswith("PIP_")]:
    del os.environ[key]
os.environ["PIP_CONFIG_FILE"] = os.devnull

def user_folder(subfolder):
    path = os.path.join({str(user)!r}, subfolder)
    os.makedirs(path, exist_ok=True)
    return path

setup_operator.online_access = lambda: True
setup_operator.user_folder = user_folder
setup_operator.REQUIREMENTS_FILE = {requirements!r}
setup_operator.EXTRA_PIP_ARGS = ("--no-index", "--find-links", {str(wheels)!r})

assert bpy.ops.syncsphere.setup_backend() == {{"FINISHED"}}
prefs = bpy.context.preferences.addons["syncsphere"].preferences
folder = os.path.join({str(user)!r}, "backend-env")
assert prefs.python_path == setup_operator.backend_setup.venv_python(folder), prefs.python_path
assert os.path.isfile(os.path.join(folder, ".syncsphere-ready"))
assert os.path.isfile(os.path.join({str(user)!r}, "logs", "backend-setup.log"))
""" + _OPERATOR_EPILOGUE, timeout=RUN_TIMEOUT_S)


def test_operator_modal_esc_cancels_and_the_timer_finishes(tmp_path):
    """The UI path without a UI: Esc cancels the running setup, a later timer tick reports it and ends.

    Headless Blender has no event loop, so ``modal`` is called directly with stand-in events, on a
    stand-in operator object that borrows the operator's methods.
    """
    if _bpy_dir() is None:
        pytest.skip("bpy is not installed")
    folder = tmp_path / "backend-env"
    requirements = write_requirements(tmp_path / "requirements.txt", "syncsphere-test-dep")
    _run_python(_OPERATOR_PRELUDE + f"""
import time
from types import SimpleNamespace

Op = setup_operator.SYNCSPHERE_OT_setup_backend
class Standin:
    modal, cancel, finish, _remove_timer = Op.modal, Op.cancel, Op.finish, Op._remove_timer
    def __init__(self):
        self.reports = []
    def report(self, kind, text):
        self.reports.append((set(kind), text))

op = Standin()
op._timer = None
op._setup = setup_operator._setup = setup_operator.backend_setup.BackendSetup(
    sys.executable, {str(folder)!r}, {requirements!r}, ["--no-index"])
op._setup.start()
context = SimpleNamespace(window_manager=bpy.context.window_manager, workspace=bpy.context.workspace,
                          preferences=bpy.context.preferences)
assert setup_operator.running_setup() is op._setup
assert op.modal(context, SimpleNamespace(type="TIMER", value="NOTHING")) == {{"PASS_THROUGH"}}
assert op.modal(context, SimpleNamespace(type="MOUSEMOVE", value="NOTHING")) == {{"PASS_THROUGH"}}
assert op.modal(context, SimpleNamespace(type="ESC", value="PRESS")) == {{"RUNNING_MODAL"}}
deadline = time.monotonic() + 60
while (result := op.modal(context, SimpleNamespace(type="TIMER", value="NOTHING"))) == {{"PASS_THROUGH"}}:
    assert time.monotonic() < deadline
    time.sleep(0.1)
assert result == {{"CANCELLED"}}, result
assert op.reports == [({{"WARNING"}}, "Backend setup cancelled")], op.reports
assert not os.path.exists({str(folder)!r})
assert setup_operator.running_setup() is None
prefs = bpy.context.preferences.addons["syncsphere"].preferences
assert prefs.python_path == ""
""" + _OPERATOR_EPILOGUE, timeout=RUN_TIMEOUT_S)
