"""The backend's layers (docs/architecture.md): no import circle, no import of a layer above or beside one's
own, and the leaves use the standard library only. Read from the source (tests/import_graph.py)."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from import_graph import find_cycle, import_graph, write_tree

REPO = Path(__file__).resolve().parent.parent

LEAVES = ("errors", "protocol", "request")
"""backend/'s own modules at the bottom: standard library only, so the CLI checks requests without torch and
the Blender side can import them."""

RANKS = {"leaves": 0, "sphere": 1, "engine": 2, "products": 2, "analysis": 3, "app": 4}
"""Each layer's height: a module imports its own layer or a lower one. engine and products stand side by side:
neither imports the other; app composes them."""


def layer_of(module: str) -> str:
    """The layer of a backend module: ``backend.engine.sync.mad`` -> ``engine``; ``backend`` itself (its
    ``__version__``) and the leaf modules -> ``leaves``; ``backend.__main__`` -> ``app``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in LEAVES:
        return "leaves"
    return "app" if parts[1] == "__main__" else parts[1]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` (a backend import graph) that breaks the layer rule, as sentences."""
    problems = []
    for module, targets in sorted(graph.items()):
        own = layer_of(module)
        if own not in RANKS:
            problems.append(f"{module} is in no layer; add its package to RANKS and docs/architecture.md")
            continue
        for target in sorted(targets):
            top = target.split(".")[0]
            if top != "backend":
                if own == "leaves" and top not in sys.stdlib_module_names and top != "__future__":
                    problems.append(f"{module} is a leaf but imports {target}, which is not in the standard library")
                continue
            other = layer_of(target)
            if other != own and RANKS.get(other, 99) >= RANKS[own]:
                problems.append(f"{module} ({own}) imports {target} ({other}), a layer above or beside its own")
    return problems


def test_the_backend_has_no_import_circle():
    assert find_cycle(import_graph(REPO, "backend")) is None


def test_no_backend_module_imports_a_layer_above_or_beside_its_own():
    assert layer_violations(import_graph(REPO, "backend")) == []


def test_every_layer_exists_and_the_checks_see_real_imports():
    graph = import_graph(REPO, "backend")
    assert {layer_of(module) for module in graph} == set(RANKS)
    # A few arrows that must be read, or the checks above would pass on an empty graph.
    assert "backend.sphere.view_sets" in graph["backend.engine.sampler"]
    assert "backend.engine.model_manager" in graph["backend.app.models_cli"]  # an import inside a function
    assert "backend.protocol" in graph["backend.app.server"]  # from .. import protocol


def test_the_checks_catch_a_circle_an_upward_import_and_a_heavy_leaf(tmp_path):
    files = {
        "backend/__init__.py": "",
        "backend/request.py": "import numpy\n",
        "backend/sphere/__init__.py": "",
        "backend/sphere/canvas.py": "from ..app import cli\n",
        "backend/engine/__init__.py": "",
        "backend/engine/sampler.py": "from ..products import images\n",
        "backend/products/__init__.py": "",
        "backend/products/images.py": "",
        "backend/app/__init__.py": "",
        "backend/app/cli.py": "def main():\n    from ..sphere.canvas import Canvas\n",
    }
    write_tree(tmp_path, files)
    graph = import_graph(tmp_path, "backend")
    assert find_cycle(graph) == ["backend.app.cli", "backend.sphere.canvas", "backend.app.cli"]
    problems = layer_violations(graph)
    assert any("backend.request is a leaf but imports numpy" in problem for problem in problems)
    assert any("backend.sphere.canvas (sphere) imports backend.app.cli (app)" in problem for problem in problems)
    assert any("backend.engine.sampler (engine) imports backend.products.images (products)" in problem for problem in problems)
    assert len(problems) == 3


LONGEST_FUNCTION_LINES = 60
"""What a function of backend/ may span (docstring included), so each reads in one screen; the denoising loop
(``sampler.sample_canvas``), read top to bottom as one piece like a diffusers pipeline's ``__call__``, may be longer."""


def long_functions(root: Path, package: str, allowed: tuple[str, ...] = ("sample_canvas",)) -> list[str]:
    """"path:line name (N lines)" of every function of ``package`` under ``root`` longer than
    ``LONGEST_FUNCTION_LINES``, except those named in ``allowed``."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in allowed:
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_backend_functions_fit_on_a_screen(tmp_path):
    assert long_functions(REPO, "backend") == []
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "long.py").write_text("def long():\n" + "    x = 1\n" * LONGEST_FUNCTION_LINES)
    assert long_functions(tmp_path, "backend") == [f"backend{os.sep}long.py:1 long (61 lines)"]
