"""The package layering, read from the source with `ast`: no import cycle among the project's modules
(function-level imports and package ``__init__`` re-exports included), and no Ray under `finetune/`.

Importing ``a.b.c`` runs the package inits ``a`` and ``a.b`` first, so a module depends on every
package above its import target too. A package and its own submodules importing each other (an
``__init__`` that re-exports) is not a cycle of layers and is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("finetune", "trainables", "search_spaces", "orchestrator", "benchmarks", "vitsweep")


def _modules() -> Dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py") if (ROOT / package).is_dir() else ():
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _targets(module: str, path: Path, node: ast.AST) -> List[str]:
    """Dotted names an import statement refers to (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
            base = ".".join(parts[:keep] + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> tuple[Dict[str, Set[str]], Set[str]]:
    """(module -> project modules it imports, finetune modules that import ray)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {}
    ray_users: Set[str] = set()
    for module, path in mods.items():
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(module, path, node):
                if target.split(".")[0] == "ray" and module.split(".")[0] == "finetune":
                    ray_users.add(module)
                while target and target not in mods:  # `from pkg import name`: name may be a function
                    target = target.rpartition(".")[0]
                while target and target != module and not module.startswith(target + "."):
                    deps.add(target)  # the target and the packages above it
                    target = target.rpartition(".")[0]
                    if target not in mods:
                        break
        graph[module] = deps
    return graph, ray_users


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _is_package_with_own_submodules(component: List[str]) -> bool:
    head = component[0]
    return all(m == head or m.startswith(head + ".") for m in component)


def test_no_import_cycles_among_project_modules():
    graph, _ = import_graph()
    cycles = [c for c in strongly_connected(graph) if not _is_package_with_own_submodules(c)]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_finetune_never_imports_ray():
    _, ray_users = import_graph()
    assert not ray_users, f"finetune/ must run without Ray; these modules import it: {sorted(ray_users)}"


def test_layers_point_one_way():
    """orchestrator -> search_spaces, trainables -> finetune; never upwards."""
    graph, _ = import_graph()
    below = {"finetune": set(), "trainables": {"finetune"}, "search_spaces": {"finetune", "trainables"}}
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if m.split(".")[0] in below and d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in below[m.split(".")[0]]
    )
    assert not upward, f"imports against the layering: {upward}"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder_finds_cycles(graph, expected):
    assert strongly_connected(graph) == expected


def test_nothing_imports_the_public_api_package():
    """`vitsweep` (the Python API) sits on top: it imports the other packages, none of them imports it."""
    graph, _ = import_graph()
    users = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                   if d.split(".")[0] == "vitsweep" and m.split(".")[0] != "vitsweep")
    assert not users, f"modules below the public API import it: {users}"
    assert any(m.startswith("vitsweep") for m in graph), "the vitsweep package was not found"
