"""The import graph of a package, read from its source with ``ast`` (nothing is imported or run).

Used by the layer tests (tests/test_backend_layers.py, tests/test_addon_layers.py): every ``import`` and ``from … import`` counts,
at module level or inside a function, because an import inside a function is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    """The dotted name of the module at ``path`` under ``root`` (the folder that holds the top package):
    ``root/backend/app/cli.py`` -> ``backend.app.cli``; a package's ``__init__.py`` is the package itself, so
    ``root/__init__.py`` (the Blender extension's root package) is ``""``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, *packages: str) -> dict[str, set[str]]:
    """{module: the modules it imports} for every module of ``packages``: folders under ``root`` (each read
    whole) or single files (such as ``__init__.py``, the extension's root package, named ``""``).

    Imported names are absolute: relative imports are resolved against the importing module, and
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module of the tree, else ``pkg``.
    Imports from outside the tree keep their full dotted name (``torch.nn``, ``os``).
    """
    paths = [path for package in packages
             for path in ([root / package] if (root / package).is_file() else sorted((root / package).rglob("*.py")))]
    files = {module_name(root, path): path for path in paths}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        current_package = name if is_package else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = current_package.split(".") if current_package else []  # [] in the root package
                    anchor = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name  # from . import x, in the root
                    imported.add(candidate if candidate in files else base)
        imported.discard(name)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, …, a], or None when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all its imports are explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Write ``files`` ({path relative to ``root``: source text}) under ``root``, folders included: the planted
    trees the layer tests check their checks on."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
