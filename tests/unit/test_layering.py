"""The package's layering, read from its source with ``ast`` (nothing is imported).

Layers, bottom up (docs/architecture.md section 1): the leaves ``batch``, ``forward``, ``objectives``,
``selection`` and ``rewards`` know nothing of the LightningModule, the DataModule or the CLI; ``data``
knows nothing of the module or the CLI; ``module`` may import ``data`` (its one contract with it is
``RolloutDataModule.connect``) but not the CLI. No module takes part in an import cycle. Every import
counts, also those inside functions (lazy imports are still dependencies). ``from a import b`` is an
edge to ``a.b`` when that is a module, else to ``a``; a submodule's implicit import of its parent
package is not an edge (otherwise every package whose ``__init__`` re-exports would be a cycle).

The checker itself is tested on small packages written to ``tmp_path``, so a broken checker cannot
pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import capo_lightning

PACKAGE_ROOT = Path(capo_lightning.__file__).parent
LEAVES = ("batch", "forward", "objectives", "selection", "rewards")
FORBIDDEN_FOR_LEAVES = ("module", "data", "cli")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for what counts)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(node, package, modules):
                if target != name:
                    graph[name].add(target)
    return graph


def _imported(node: ast.AST, package: str, modules: dict[str, Path]) -> list[str]:
    """The package's modules that one import statement imports."""
    if isinstance(node, ast.Import):
        found = [_longest_module_prefix(alias.name, modules) for alias in node.names]
        return [m for m in found if m is not None]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: drop (level - 1) trailing parts of the importer's package
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.append(submodule if submodule in modules else _longest_module_prefix(base, modules))
    return [m for m in found if m is not None]


def _longest_module_prefix(target: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``target`` that is one of ``modules``, or None (outside the package)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or with a self-loop), sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def layer_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    """``importer -> imported`` for every import that goes against the layers."""
    rules = {f"{package}.{leaf}": FORBIDDEN_FOR_LEAVES for leaf in LEAVES}
    rules[f"{package}.data"] = ("module", "cli")
    rules[f"{package}.module"] = ("cli",)
    bad = []
    for importer, imported in sorted(graph.items()):
        for layer, forbidden in rules.items():
            if importer != layer and not importer.startswith(layer + "."):
                continue
            for target in sorted(imported):
                if any(target == f"{package}.{f}" or target.startswith(f"{package}.{f}.") for f in forbidden):
                    bad.append(f"{importer} -> {target}")
    return bad


# ---- the package ---------------------------------------------------------------------------------


def test_leaves_and_data_respect_the_layers() -> None:
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 40  # the walk found the package
    assert "capo_lightning.data.datamodule" in graph["capo_lightning.module"]  # the one visible contract
    assert layer_violations(graph, "capo_lightning") == []


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph(PACKAGE_ROOT)) == []


def test_module_probes_nothing_by_name() -> None:
    """module.py reaches the DataModule through connect() only: no hasattr, no getattr on it."""
    tree = ast.parse((PACKAGE_ROOT / "module.py").read_text())
    probes = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and (node.func.id == "hasattr" or (node.func.id == "getattr" and "datamodule" in ast.unparse(node.args[0])))
    ]
    assert probes == []


def test_files_and_functions_stay_small() -> None:
    """No library file over 300 lines, no function over 60 (decorators and docstrings included)."""
    too_long = []
    for name, path in module_files(PACKAGE_ROOT).items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert too_long == []


# ---- the checker, on packages written here -------------------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a leaf importing the DataModule, absolutely and lazily inside a function
        (
            {"objectives/grpo.py": "def f():\n    from pkg.data.datamodule import DM\n"},
            ["pkg.objectives.grpo -> pkg.data.datamodule"],
        ),
        # relative import from a leaf into the module
        ({"selection/capo.py": "from ..module import CAPOModule\n"}, ["pkg.selection.capo -> pkg.module"]),
        # the data layer importing the module
        ({"data/datamodule.py": "import pkg.module\n"}, ["pkg.data.datamodule -> pkg.module"]),
        # allowed: the module imports data, a leaf imports another leaf
        ({"module.py": "from pkg.data import datamodule\n", "selection/capo.py": "from pkg.batch import B\n"}, []),
    ],
)
def test_checker_finds_layer_violations(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    base = {f"{p}/__init__.py": "" for p in ("objectives", "selection", "data")}
    base |= {"__init__.py": "", "module.py": "", "batch.py": "", "cli.py": "", "data/datamodule.py": ""}
    base |= {"objectives/grpo.py": "", "selection/capo.py": ""}
    root = _write_package(tmp_path, base | files)
    assert layer_violations(import_graph(root), "pkg") == expected


def test_checker_finds_cycles_but_not_reexporting_packages(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        # a package whose __init__ re-exports its submodule, which imports a sibling: no cycle
        "sel/__init__.py": "from pkg.sel.capo import CAPO\n",
        "sel/capo.py": "from pkg.sel import curvature\n",
        "sel/curvature.py": "",
        # a real three-module cycle, one edge of it lazy
        "a.py": "import pkg.b\n",
        "b.py": "from pkg import c\n",
        "c.py": "def f():\n    from pkg.a import x\n",
    }
    graph = import_graph(_write_package(tmp_path, files))
    assert graph["pkg.sel.capo"] == {"pkg.sel.curvature"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
