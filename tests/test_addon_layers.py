"""The Blender extension's layers (docs/architecture.md, docs/blender.md "Layout"): no import circle, no bpy
below ``blender_addon/scene/``, and no import of a part above one's own. Read from the source
(tests/import_graph.py), except the last test, which imports every core module with Blender made unimportable.

From the bottom up: ``blender_addon/core/`` (plain Python: the standard library, itself and the backend's
standard-library leaves), ``blender_addon/scene/`` (bpy; may import core), ``operators/`` and ``panels/`` (may
import both), and the root ``__init__.py``, which registers everything and which nothing imports.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from import_graph import find_cycle, import_graph, write_tree
from test_backend_layers import LEAVES

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

ADDON_SOURCES = ("__init__.py", "blender_addon", "operators", "panels")
"""The add-on's files, as import_graph reads them: the root package (named ``""``) and three packages."""

BLENDER_MODULES = ("bpy", "mathutils", "bpy_extras")
"""Modules that exist only inside Blender: core must import none of them."""

BACKEND_LEAVES = {"backend"} | {f"backend.{leaf}" for leaf in LEAVES}
"""What core may import from the backend: its standard-library leaves (and the package, whose __init__ only
holds ``__version__``), which ship inside the extension."""

RANKS = {"core": 0, "scene": 1, "operators": 2, "panels": 2, "root": 3}
"""Each part's height: a module imports its own part or a lower one. operators and panels stand side by side
(neither imports the other; panels name operators by their idname)."""


def addon_graph(root: Path) -> dict[str, set[str]]:
    """The import graph of the add-on under ``root`` (its root ``__init__.py``, ``blender_addon/``, ``operators/``,
    ``panels/``), read together with ``backend/`` so that core's imports of the backend name the module."""
    graph = import_graph(root, *ADDON_SOURCES, "backend")
    return {module: targets for module, targets in graph.items() if part_of(module) != "backend"}


def part_of(module: str) -> str:
    """The part of the extension a module belongs to: ``blender_addon.core.generation`` -> ``core``;
    ``blender_addon`` itself -> ``core`` (it runs whenever core is imported); ``operators.generate`` ->
    ``operators``; ``""`` (the root ``__init__.py``) -> ``root``; a backend module -> ``backend``; a module of
    ``blender_addon`` in neither core nor scene -> ``blender_addon``, which is no part."""
    parts = module.split(".")
    if module == "":
        return "root"
    if parts[0] == "blender_addon":
        return "core" if len(parts) == 1 else parts[1] if parts[1] in ("core", "scene") else "blender_addon"
    return parts[0]


def core_import_problem(target: str) -> str | None:
    """Why a core module may not import ``target``, as the end of a sentence, or None when it may."""
    top = target.split(".")[0]
    if top in BLENDER_MODULES:
        return "which exists only inside Blender; core must run without it"
    if top == "backend":
        return None if target in BACKEND_LEAVES else "which is not one of the backend's standard-library leaves"
    if top in ("blender_addon", "operators", "panels") or target == "":
        return None if part_of(target) == "core" else f"from {part_of(target)}, a part above core"
    if top not in sys.stdlib_module_names and top != "__future__":
        return "which is not in the standard library"
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` (an add-on import graph) that breaks the layer rule, as sentences."""
    problems = []
    for module, targets in sorted(graph.items()):
        own = part_of(module)
        if own not in RANKS:
            problems.append(f"{module} is in no part of the add-on; move it into blender_addon/core/ or "
                            "blender_addon/scene/")
            continue
        for target in sorted(targets):
            if own == "core":
                reason = core_import_problem(target)
                if reason:
                    problems.append(f"{module} (core) imports {target}, {reason}")
                continue
            other = part_of(target)
            if other in RANKS and other != own and RANKS[other] >= RANKS[own]:
                problems.append(f"{module} ({own}) imports {target} ({other}), a part above or beside its own")
    return problems


def test_the_addon_has_no_import_circle():
    assert find_cycle(addon_graph(REPO)) is None


def test_no_addon_module_imports_a_part_above_or_beside_its_own():
    assert layer_violations(addon_graph(REPO)) == []


def test_every_part_exists_and_the_checks_see_real_imports():
    graph = addon_graph(REPO)
    assert {part_of(module) for module in graph} == set(RANKS)
    # A few arrows that must be read, or the checks above would pass on an empty graph.
    assert {"blender_addon.scene", "operators", "panels"} <= graph[""]
    assert "blender_addon.core.lighting" in graph["blender_addon.scene.world"]
    assert "bpy" in graph["blender_addon.scene.world"]
    assert "backend.protocol" in graph["blender_addon.core.worker_client"]  # from ...backend import protocol
    assert "backend.request" in graph["blender_addon.core.generation"]


def test_the_checks_catch_bpy_in_core_an_upward_import_and_a_circle(tmp_path):
    files = {
        "__init__.py": "from .blender_addon import scene\nfrom . import operators, panels\n",
        "backend/__init__.py": "",
        "backend/request.py": "",
        "backend/engine/__init__.py": "",
        "backend/engine/sampler.py": "",
        "blender_addon/__init__.py": "",
        "blender_addon/core/__init__.py": "",
        "blender_addon/core/generation.py": "import bpy\nfrom ...backend import request\n",
        "blender_addon/core/session.py": "def start():\n    from ..scene import world\n",
        "blender_addon/core/worker_client.py": "from ...backend.engine import sampler\nimport numpy\n",
        "blender_addon/scene/__init__.py": "",
        "blender_addon/scene/world.py": "import bpy\nfrom mathutils import Vector\nfrom ...panels import draw_main\n",
        "blender_addon/stray.py": "",
        "operators/__init__.py": "from ..blender_addon.core import session\n",
        "panels/__init__.py": "from ..blender_addon.scene import world\n",
    }
    write_tree(tmp_path, files)
    graph = addon_graph(tmp_path)
    assert find_cycle(graph) == ["blender_addon.scene.world", "panels", "blender_addon.scene.world"]
    assert sorted(layer_violations(graph)) == sorted([
        "blender_addon.core.generation (core) imports bpy, which exists only inside Blender; core must run without it",
        "blender_addon.core.session (core) imports blender_addon.scene.world, from scene, a part above core",
        "blender_addon.core.worker_client (core) imports backend.engine.sampler, which is not one of the "
        "backend's standard-library leaves",
        "blender_addon.core.worker_client (core) imports numpy, which is not in the standard library",
        "blender_addon.scene.world (scene) imports panels (panels), a part above or beside its own",
        "blender_addon.stray is in no part of the add-on; move it into blender_addon/core/ or blender_addon/scene/",
    ])


def test_every_core_module_imports_without_blender_or_torch():
    """Imported for real, in a fresh interpreter (this one may already hold bpy: pytest imports the repository's
    root package when it collects the tests), as the tests import core: the repository registered as the
    package ``syncsphere`` without running its __init__ (tests/conftest.py). Blender's modules and torch are
    made unimportable, and none may be loaded afterwards."""
    blocked = (*BLENDER_MODULES, "torch")
    code = f"""
        import importlib, importlib.abc, pkgutil, sys
        sys.path.insert(0, {str(TESTS)!r})

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if fullname.partition(".")[0] in {blocked!r}:
                    raise ImportError(f"{{fullname}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Blocker())
        import conftest  # registers the package syncsphere
        core = importlib.import_module("syncsphere.blender_addon.core")
        names = [info.name for info in pkgutil.iter_modules(core.__path__)]
        for name in names:
            importlib.import_module("syncsphere.blender_addon.core." + name)
        loaded = sorted(module for module in sys.modules if module.partition(".")[0] in {blocked!r})
        assert not loaded, loaded
        print(" ".join(names))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {path.stem for path in (REPO / "blender_addon" / "core").glob("[!_]*.py")}
