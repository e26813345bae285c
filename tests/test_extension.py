"""Tests of the Blender extension layer: manifest, build, import rules, registration, backend command.

Run with ``python -m pytest tests/test_extension.py`` from the repository root, in an environment that
has the ``bpy`` module (headless Blender). Everything that imports bpy runs in a subprocess, so the
pytest process itself never imports bpy or the add-on and the tests cannot leak state into each other.
"""

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from syncsphere.blender_addon.core import backend_command
from tools.build_extension import build_extension, bundled_extension_tool

REPO = Path(__file__).resolve().parents[1]

# The folders whose modules Blender imports; none of them may import torch (docs/conventions.md#extension).
ADDON_PACKAGES = ("blender_addon", "operators", "panels")

PANEL_CLASSES = ("SYNCSPHERE_PT_world", "SYNCSPHERE_PT_view3d")
OPERATOR_CLASSES = ("SYNCSPHERE_OT_check_backend", "SYNCSPHERE_OT_open_output_folder", "SYNCSPHERE_OT_generate",
                    "SYNCSPHERE_OT_cancel", "SYNCSPHERE_OT_bake_to_uv", "SYNCSPHERE_OT_export_cubemap",
                    "SYNCSPHERE_OT_setup_backend", "SYNCSPHERE_OT_refresh_models", "SYNCSPHERE_OT_download_model",
                    "SYNCSPHERE_OT_cancel_model_download", "SYNCSPHERE_OT_remove_model", "SYNCSPHERE_OT_set_default_model")


def _bpy_dir():
    """Return the folder of the installed bpy module, or None when bpy is not installed."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _blender_ext_tool():
    """Return the path of Blender's extension tool (blender_ext.py) shipped inside bpy, or skip."""
    bpy_dir = _bpy_dir()
    if bpy_dir is None:
        pytest.skip("bpy is not installed")
    tool = bundled_extension_tool()  # what tools/build_extension.py builds with
    if tool is None:
        pytest.skip(f"blender_ext.py not found under {bpy_dir}")
    return tool


def _run_python(code, *, check=True, timeout=300):
    """Run ``code`` in a fresh interpreter (this one) with the repository as working directory."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# Prepended to subprocess code: an import blocker and a loader for the add-on package.
# The repository folder's own name differs between checkouts (CI clones under another name), so the
# root package is loaded from its __init__.py under the fixed name "syncsphere", the way Blender loads
# it under "bl_ext.<repository>.syncsphere". Editing sys.modules is fine here, in the test harness;
# the add-on itself never does it.
_PRELUDE = f"""
import importlib.abc, importlib.util, sys

REPO = {str(REPO)!r}

class Blocker(importlib.abc.MetaPathFinder):
    '''Make importing any of the given top-level modules fail, as if they were not installed.'''

    def __init__(self, *names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ImportError(f"{{fullname}} is blocked in this test")
        return None

def load_addon(name="syncsphere"):
    '''Import the repository root as the package ``name`` and return it.'''
    spec = importlib.util.spec_from_file_location(
        name, REPO + "/__init__.py", submodule_search_locations=[REPO])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
"""

# Runs after _PRELUDE in the Blender tests' scripts: registers the add-on and enables it the way Blender
# does (its preferences entry), as ``addon``.
_ENABLE_ADDON = r"""
addon = load_addon()
addon.register()
entry = bpy.context.preferences.addons.new()
entry.module = "syncsphere"
"""

# Test scripts run in Blender define write_exr with this (after importing numpy as np and bpy).
_WRITE_EXR = r"""
def write_exr(path, rgb):
    '''Write an (H, W, 3) scene-linear array, top row first (as the backend does), as a float EXR; returns path.

    Image.save() writes a generated float image sRGB-encoded (seen on 4.2 and 5.0), so the file is
    written with save_render, which stores EXR values linear and unchanged.
    '''
    rgb = np.asarray(rgb, dtype=np.float32)
    height, width, _ = rgb.shape
    image = bpy.data.images.new("test-exr", width, height, float_buffer=True, alpha=False)
    pixels = np.ones((height, width, 4), np.float32)
    pixels[..., :3] = rgb[::-1]  # Image.pixels starts at the bottom row
    image.pixels.foreach_set(pixels.ravel())
    settings = bpy.context.scene.render.image_settings
    settings.file_format, settings.color_depth, settings.color_mode = "OPEN_EXR", "32", "RGB"
    image.save_render(path, scene=bpy.context.scene)
    bpy.data.images.remove(image)
    return path
"""


# --- manifest and build ------------------------------------------------------------------------


def test_manifest_validates_with_blenders_tool():
    """Blender's own validator accepts the manifest and the package layout."""
    tool = _blender_ext_tool()
    result = subprocess.run(
        [sys.executable, str(tool), "validate", str(REPO)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_manifest_texts_follow_listing_rules():
    """Tagline and permission reasons: at most 64 characters, no trailing punctuation
    (docs/conventions.md#blender-rules)."""
    import tomllib

    manifest = tomllib.loads((REPO / "blender_manifest.toml").read_text(encoding="utf-8"))
    assert manifest["id"] == "syncsphere"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert manifest["blender_version_min"] == "4.2.0"
    texts = [manifest["tagline"], *manifest["permissions"].values()]
    assert set(manifest["permissions"]) == {"files", "network"}
    for text in texts:
        assert 0 < len(text) <= 64, text
        assert text[-1].isalnum(), f"trailing punctuation in {text!r}"


def _copy_source_with_clutter(dest):
    """Copy the repository's source to ``dest`` and add the clutter a developer checkout has.

    The clutter is added explicitly so the test does not depend on what happens to be on disk
    (a .venv/ exists in some checkouts and not in others).
    """
    shutil.copytree(
        REPO, dest,
        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.zip"),
    )
    clutter = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".venv/pyvenv.cfg",
        ".ci/workflow.yml",
        ".gitignore",
        ".git/HEAD",
        ".pytest_cache/v/cache/lastfailed",
        "tests/test_clutter.py",
        "benchmarks/bench_clutter.py",
        "docs/clutter.md",
        "backend/__pycache__/request.cpython-311.pyc",
        "__pycache__/__init__.cpython-311.pyc",
        "outputs/job/panorama.png",
    ]
    for rel in clutter:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("clutter\n", encoding="utf-8")
    return clutter


def test_build_zip_contains_backend_and_no_development_files(tmp_path):
    """tools/build_extension.py (Blender's ``blender_ext.py build``, then its ``validate``, which raises when the
    zip is not valid) packs the add-on and backend/, and leaves development files out."""
    _blender_ext_tool()  # skips without bpy
    source = tmp_path / "syncsphere-checkout"
    _copy_source_with_clutter(source)
    out_dir = tmp_path / "dist"
    archive = build_extension(out_dir, source)
    zips = list(out_dir.glob("*.zip"))
    assert zips == [archive] and archive.name == "syncsphere-0.1.0.zip"

    with zipfile.ZipFile(zips[0]) as archive:
        names = archive.namelist()
    files = [n for n in names if not n.endswith("/")]

    for required in ("blender_manifest.toml", "__init__.py", "backend/__init__.py",
                     "blender_addon/__init__.py", "blender_addon/core/backend_command.py",
                     "blender_addon/scene/__init__.py", "operators/__init__.py", "panels/__init__.py",
                     # the backend's leaves, which blender_addon/core imports
                     "backend/errors.py", "backend/protocol.py", "backend/request.py"):
        assert required in files, f"{required} missing from {sorted(files)}"

    excluded_tops = ("tests", "benchmarks", "docs", "tools", ".ci", ".venv", ".git", ".pytest_cache",
                     "outputs")
    for name in files:
        parts = name.split("/")
        assert parts[0] not in excluded_tops, f"{name} should not be in the extension"
        assert "__pycache__" not in parts and not name.endswith(".pyc"), name
        assert not any(part.startswith(".") for part in parts), name


def test_the_readmes_build_command_makes_a_valid_zip_and_says_how_to_install_it(tmp_path):
    """``python tools/build_extension.py`` as the README runs it: the zip, validated, and the next step."""
    _blender_ext_tool()
    done = subprocess.run([sys.executable, "tools/build_extension.py", "--output-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    archive = tmp_path / "syncsphere-0.1.0.zip"
    assert f"built and validated {archive}" in done.stdout and "Install from Disk" in done.stdout
    with zipfile.ZipFile(archive) as opened:
        assert "blender_manifest.toml" in opened.namelist() and "backend/request.py" in opened.namelist()
    refused = subprocess.run([sys.executable, "tools/build_extension.py", "--output-dir", str(tmp_path / "not"),
                              "--blender", str(tmp_path / "no-blender")], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--blender" in refused.stderr


# --- import rules --------------------------------------------------------------------------------


def test_addon_imports_without_torch():
    """The add-on's packages import with torch (and libraries built on it) made unimportable."""
    if _bpy_dir() is None:
        pytest.skip("bpy is not installed")
    _run_python(_PRELUDE + """
sys.meta_path.insert(0, Blocker("torch", "diffusers", "transformers"))
import bpy
load_addon()
import syncsphere.blender_addon.scene, syncsphere.blender_addon.scene.preferences
import syncsphere.blender_addon.core.backend_command, syncsphere.blender_addon.core.worker_client
import syncsphere.operators, syncsphere.panels
assert "torch" not in sys.modules
""")


def test_backend_imports_without_bpy():
    """``import backend`` works with bpy made unimportable, and does not pull bpy in."""
    _run_python(_PRELUDE + """
sys.meta_path.insert(0, Blocker("bpy"))
sys.path.insert(0, REPO)
import backend
assert "bpy" not in sys.modules
""")


def _forbidden_uses(tree):
    """Yield a description of each sys.path / sys.modules use and torch import in an AST."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ("path", "modules")
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            yield f"line {node.lineno}: sys.{node.attr}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == "torch":
                    yield f"line {node.lineno}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").partition(".")[0] == "torch":
            yield f"line {node.lineno}: from {node.module} import ..."


@pytest.mark.parametrize("folder", ["", *ADDON_PACKAGES])
def test_addon_sources_do_not_touch_import_machinery(folder):
    """No add-on source uses sys.path / sys.modules or imports torch (docs/conventions.md#blender-rules).

    The subprocess tests above catch a torch import at run time; this catches one in a code path
    those imports do not execute (inside a function).
    """
    directory = REPO / folder
    sources = [directory / "__init__.py"] if not folder else sorted(directory.rglob("*.py"))
    assert sources
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        found = list(_forbidden_uses(tree))
        assert not found, f"{source.relative_to(REPO)}: {found}"


# --- registration in headless Blender ---------------------------------------------------------------


def test_register_unregister_twice_leaves_nothing_registered():
    """register()/unregister() work twice in a row and leave no SyncSphere class behind."""
    if _bpy_dir() is None:
        pytest.skip("bpy is not installed")
    _run_python(_PRELUDE + f"""
import bpy
addon = load_addon()
PANELS = {PANEL_CLASSES!r}
OPERATORS = {OPERATOR_CLASSES!r}
from syncsphere.blender_addon.scene.preferences import SyncSpherePreferences

for attempt in range(2):
    addon.register()
    for name in PANELS + OPERATORS:
        assert hasattr(bpy.types, name), (attempt, name)
    assert SyncSpherePreferences.is_registered
    assert hasattr(bpy.ops.syncsphere, "check_backend")

    # Enable the add-on's preferences the way Blender does when it enables the add-on.
    entry = bpy.context.preferences.addons.new()
    entry.module = "syncsphere"
    prefs = bpy.context.preferences.addons["syncsphere"].preferences
    assert prefs.default_model == "stabilityai/stable-diffusion-2-base"
    assert prefs.device == "auto" and prefs.python_path == "" and prefs.output_dir == ""
    # The check operator runs for real and explains a missing interpreter (errors raise in
    # background mode).
    try:
        bpy.ops.syncsphere.check_backend()
    except RuntimeError as exc:
        assert "No backend Python interpreter is set" in str(exc), exc
    else:
        raise AssertionError("check_backend should fail without an interpreter")
    bpy.context.preferences.addons.remove(entry)

    addon.unregister()
    for name in PANELS + OPERATORS:
        assert not hasattr(bpy.types, name), (attempt, name)
    assert not SyncSpherePreferences.is_registered
print("ok")
""")


# --- backend command line ------------------------------------------------------------------------


def test_backend_command_line_and_environment():
    """The worker command and its environment are what docs/conventions.md#extension specifies."""
    assert backend_command.backend_command("/opt/py/bin/python") == [
        "/opt/py/bin/python", "-m", "backend", "serve", "--stdio"]
    assert backend_command.backend_command("py", "info") == ["py", "-m", "backend", "info"]
    # The extension folder is the repository root: the folder that holds backend/.
    assert Path(backend_command.EXTENSION_DIR) == REPO

    base = {"PATH": "/usr/bin", "PYTHONPATH": "/blender/scripts/modules", "PYTHONHOME": "/blender"}
    env = backend_command.backend_environment("/ext/syncsphere", base_env=base)
    assert env["PYTHONPATH"] == "/ext/syncsphere"
    assert "PYTHONHOME" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONIOENCODING"] == "utf-8"
    assert "HF_HUB_OFFLINE" not in env
    assert base["PYTHONPATH"] == "/blender/scripts/modules", "the base environment is not modified"
    assert backend_command.backend_environment(base_env={})["PYTHONPATH"] == backend_command.EXTENSION_DIR
    assert backend_command.backend_environment(base_env={}, allow_network=False)["HF_HUB_OFFLINE"] == "1"


def test_interpreter_errors_are_readable(tmp_path):
    """Unset or missing interpreters give one readable sentence; a real one gives None."""
    assert "No backend Python interpreter is set" in backend_command.interpreter_error("")
    assert "does not exist" in backend_command.interpreter_error(str(tmp_path / "nope" / "python"))
    assert backend_command.interpreter_error(sys.executable) is None
    ok, text = backend_command.run_backend("", "info")
    assert not ok and "No backend Python interpreter is set" in text


def test_run_backend_runs_the_module_from_the_extension_folder(tmp_path):
    """run_backend runs ``python -m backend ...`` with the extension folder on PYTHONPATH."""
    extension = tmp_path / "extension"
    (extension / "backend").mkdir(parents=True)
    (extension / "backend" / "__init__.py").write_text("", encoding="utf-8")
    (extension / "backend" / "__main__.py").write_text(textwrap.dedent("""
        import os, sys
        if sys.argv[1:] == ["fail"]:
            print("model not found", file=sys.stderr)
            sys.exit(3)
        print("args", sys.argv[1:])
        print("path", os.environ["PYTHONPATH"])
        print("offline", os.environ.get("HF_HUB_OFFLINE"))
    """), encoding="utf-8")

    ok, text = backend_command.run_backend(sys.executable, "info", extension_dir=extension, allow_network=False)
    assert ok, text
    assert "args ['info']" in text
    assert f"path {extension}" in text
    assert "offline 1" in text

    ok, text = backend_command.run_backend(sys.executable, "fail", extension_dir=extension)
    assert not ok
    assert "exit status 3" in text and "model not found" in text
