"""The package's layering, read from its source with ``ast`` (nothing is imported).

Every part of the package (a subpackage, or a module at the root) says which other parts it may import
(:data:`ALLOWED`, the table of docs/architecture.md section 1); an import of any other part is a violation,
and a part missing from the table is one too (a new room must be placed). Read bottom up: ``keys`` and
``batch`` import nothing of the package; the leaves ``objectives``, ``selection``, ``rewards`` and
``models`` import only those two, never each other; ``scale``, ``rollout`` and ``evaluation`` add the
leaves they are built on; ``data`` (prompts to batches) and ``training`` (the step) never import each
other; ``callbacks`` read the step (``training``, ``selection``) and never the data or the module;
``module`` imports everything below it but no callback; ``commands`` sit on top. ``report`` stands apart:
it imports only ``keys``, and only ``commands`` import it. No module takes part in an import cycle.

Every import counts, also those inside functions (lazy imports are still dependencies). ``from a import b``
is an edge to ``a.b`` when that is a module, else to ``a``; a submodule's implicit import of its parent
package is not an edge (otherwise every package whose ``__init__`` re-exports would be a cycle). The old
dotted names that ``capo_lightning/__init__.py`` maps to moved modules are strings there, not imports.

Library code stays small by design, not by packing: no file over 300 lines, no function over 60, no
line over 100 characters (the formatter's width for ``capo_lightning/``, its ``ruff.toml``) and no
``# fmt: skip`` or ``# fmt: off`` that would exempt code from the formatter's layout.

The checkers themselves are tested on small packages written to ``tmp_path``, so a broken checker cannot
pass silently.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

import capo_lightning

PACKAGE_ROOT = Path(capo_lightning.__file__).parent
BASE = frozenset({"keys", "batch", "faults"})
LEAVES = ("objectives", "selection", "rewards", "models")
ALLOWED: dict[str, frozenset[str]] = {
    "__init__": frozenset(),  # the package imports nothing of itself (old names are mapped lazily)
    "keys": frozenset(),  # the leaf module of every metric key
    "faults": frozenset(),  # the fault-injection points, a leaf every part may call
    "batch": frozenset(),  # the rollout batch and the shape legend
    **{leaf: BASE for leaf in LEAVES},
    "scale": BASE | {"models"},
    "rollout": BASE | {"models", "scale"},
    "evaluation": BASE | {"rewards"},
    "data": BASE | {"rewards", "rollout"},
    "training": BASE | {"objectives", "selection", "models", "scale"},
    "callbacks": BASE | {"selection", "training"},
    "module": BASE | {*LEAVES, "scale", "rollout", "evaluation", "data", "training"},
    "commands": BASE | {*LEAVES, "scale", "rollout", "evaluation", "data", "training", "callbacks", "module", "report"},
    "__main__": frozenset({"commands"}),
    "report": frozenset({"keys"}),  # reads a run's files; imported only by commands
}
"""Part -> the other parts it may import (its own modules it always may)."""
# The boundaries docs/architecture.md states in words; the table above must keep every one of them.
NEVER: dict[str, tuple[str, ...]] = {
    "keys": tuple(p for p in ALLOWED if p != "keys"),
    "faults": tuple(p for p in ALLOWED if p != "faults"),
    "report": tuple(p for p in ALLOWED if p not in ("keys", "report")),
    "objectives": ("selection",),
    "selection": ("objectives",),
    **{
        leaf: ("module", "data", "training", "callbacks", "commands", "report")
        for leaf in ("batch", "keys", "faults", *LEAVES, "scale", "rollout", "evaluation")
    },
    "data": ("module", "training", "callbacks", "commands", "report"),
    "training": ("module", "data", "callbacks", "commands", "report"),
    "callbacks": ("module", "data", "commands", "report"),
    "module": ("commands", "callbacks", "report"),
}
MAX_ROOT_FILES = 6  # .py files at the root besides __init__.py and __main__.py
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60
MAX_LINE_CHARS = 100
FORMATTER_OFF = re.compile(r"#\s*fmt:\s*(skip|off)\b")  # a comment that turns the formatter off


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


def part_of(module: str, package: str) -> str:
    """The part a module belongs to: ``pkg.training.plan`` -> ``training``, ``pkg`` -> ``__init__``."""
    rest = module.removeprefix(package).removeprefix(".")
    return rest.split(".")[0] if rest else "__init__"


def layer_violations(
    graph: dict[str, set[str]], package: str, allowed: dict[str, frozenset[str]] = ALLOWED
) -> list[str]:
    """``importer -> imported`` for every import of a part the importer's part may not import, and
    ``module: in no layer`` for every module whose part the table does not place."""
    bad = []
    for importer, imported in sorted(graph.items()):
        part = part_of(importer, package)
        if part not in allowed:
            bad.append(f"{importer}: in no layer")
            continue
        for target in sorted(imported):
            target_part = part_of(target, package)
            if target_part != part and target_part not in allowed[part]:
                bad.append(f"{importer} -> {target}")
    return bad


# ---- the package ---------------------------------------------------------------------------------


def test_every_part_imports_only_what_its_layer_allows() -> None:
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 40  # the walk found the package
    assert "capo_lightning.data.datamodule" in graph["capo_lightning.module"]  # the one visible contract
    assert {part_of(m, "capo_lightning") for m in graph} == set(ALLOWED)  # every part placed, none stale
    assert layer_violations(graph, "capo_lightning") == []


def test_the_table_keeps_every_stated_boundary_and_has_no_cycle() -> None:
    """The words of docs/architecture.md section 1 hold of the table itself (loosening it to let a
    forbidden import in fails here), and the table is a partial order: parts form no cycle either."""
    assert [f"{p} -> {q}" for p, never in NEVER.items() for q in never if q in ALLOWED[p]] == []
    part_graph = {part: set(allowed) for part, allowed in ALLOWED.items()}
    assert find_cycles(part_graph) == []
    assert [p for p, allowed in ALLOWED.items() if "report" in allowed] == ["commands"]


def doc_table(text: str) -> dict[str, frozenset[str]]:
    """The room table of docs/architecture.md section 1 as room -> rooms it may import: backticked
    names before any ``;``, "nothing" for none, "anything" for every other room but the entry points,
    "everything above except `x`" for the rows above it less those named."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.split("## 1.")[1].split("### The package")[0].splitlines()
        if line.startswith("| `")
    ]
    rooms = [re.findall(r"`([^`]+)`", row[0])[0] for row in rows]
    table = {}
    for i, (room, row) in enumerate(zip(rooms, rows, strict=True)):
        words = row[2].split(";")[0]
        named = set(re.findall(r"`([^`]+)`", words))
        if words.startswith("nothing"):
            table[room] = frozenset()
        elif words.startswith("anything"):
            table[room] = frozenset(set(rooms) - {room, "__main__", "__init__"})
        elif words.startswith("everything above except"):
            table[room] = frozenset(set(rooms[:i]) - named)
        else:
            table[room] = frozenset(named)
    return table


def test_the_architecture_document_states_the_table_the_test_enforces() -> None:
    doc = (PACKAGE_ROOT.parent / "docs" / "architecture.md").read_text()
    assert doc_table(doc) == ALLOWED


def test_the_document_table_reader_reads_each_form() -> None:
    text = (
        "## 1. Layers\n| room | what | may import |\n|---|---|---|\n| `a` | x | nothing of it |\n"
        "| `b` | x | `a` |\n| `c` | x | everything above except `a` |\n| `d` | x | anything |\n"
        "| `e` | x | `a` only; only `d` imports it |\n### The package\n| `z` | y | `a` |\n"
    )
    assert doc_table(text) == {
        "a": frozenset(),
        "b": frozenset({"a"}),
        "c": frozenset({"b"}),
        "d": frozenset({"a", "b", "c", "e"}),
        "e": frozenset({"a"}),
    }


def test_the_root_shows_the_layers() -> None:
    """Few modules at the package root: the rest live in rooms named for what they are."""
    root_files = sorted(p.name for p in PACKAGE_ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(root_files) <= MAX_ROOT_FILES, root_files


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


def size_violations(root: Path) -> list[str]:
    """Every file of the package at ``root`` over ``MAX_FILE_LINES`` lines, function over
    ``MAX_FUNCTION_LINES`` (decorators and docstrings included), line over ``MAX_LINE_CHARS``
    characters, and comment that turns the formatter off (``# fmt: skip``, ``# fmt: off``)."""
    found = []
    for name, path in module_files(root).items():
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_FILE_LINES:
            found.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
        found += [
            f"{name}:{number}: {len(line)} characters"
            for number, line in enumerate(lines, 1)
            if len(line) > MAX_LINE_CHARS
        ]
        found += [
            f"{name}:{token.start[0]}: {token.string}"
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT and FORMATTER_OFF.search(token.string)
        ]
    return found


def test_files_functions_and_lines_stay_small_without_formatter_exemptions() -> None:
    """No library file over 300 lines, no function over 60 (decorators and docstrings included), no
    line over 100 characters, no ``# fmt: skip`` or ``# fmt: off``."""
    assert len(module_files(PACKAGE_ROOT)) > 40  # the walk found the package
    assert size_violations(PACKAGE_ROOT) == []


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
        # two leaves of one layer importing each other
        ({"selection/capo.py": "from pkg.objectives import grpo\n"}, ["pkg.selection.capo -> pkg.objectives.grpo"]),
        # keys importing anything of the package, report importing more than keys
        ({"keys.py": "import pkg.batch\n"}, ["pkg.keys -> pkg.batch"]),
        ({"report/runs.py": "from pkg import keys, batch\n"}, ["pkg.report.runs -> pkg.batch"]),
        # a callback reading the DataModule; the step importing the data side; the module importing a callback
        ({"callbacks/x.py": "from pkg.data.datamodule import DM\n"}, ["pkg.callbacks.x -> pkg.data.datamodule"]),
        ({"training/plan.py": "import pkg.data\n"}, ["pkg.training.plan -> pkg.data"]),
        ({"module.py": "from pkg.callbacks import x\n"}, ["pkg.module -> pkg.callbacks.x"]),
        # a part the table does not place
        ({"extras/thing.py": ""}, ["pkg.extras: in no layer", "pkg.extras.thing: in no layer"]),
        # allowed: the module imports data, a leaf imports the base, a callback the step, report keys,
        # the commands the report, a package its own modules
        (
            {
                "module.py": "from pkg.data import datamodule\n",
                "selection/capo.py": "from pkg.batch import B\nfrom pkg.selection import rows\n",
                "callbacks/x.py": "from pkg.training import plan\n",
                "report/runs.py": "from pkg import keys\n",
                "commands/cli.py": "import pkg.report.runs\n",
            },
            [],
        ),
    ],
)
def test_checker_finds_layer_violations(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    packages = ("objectives", "selection", "data", "training", "callbacks", "commands", "report")
    base = {f"{p}/__init__.py": "" for p in packages}
    base |= {"__init__.py": "", "module.py": "", "batch.py": "", "keys.py": "", "data/datamodule.py": ""}
    base |= {"objectives/grpo.py": "", "selection/capo.py": "", "selection/rows.py": "", "training/plan.py": ""}
    base |= {"callbacks/x.py": "", "commands/cli.py": "", "report/runs.py": ""}
    if any(path.startswith("extras/") for path in files):
        base["extras/__init__.py"] = ""
    root = _write_package(tmp_path, base | files)
    assert layer_violations(import_graph(root), "pkg") == expected


_LONG_FUNCTION = "@decorator\ndef f():\n" + "    x = 1\n" * 59  # 61 lines with its decorator


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("x = 1\n" * MAX_FILE_LINES, []),  # at the limits: nothing to say
        ("x = 1\n" * (MAX_FILE_LINES + 1), ["pkg.a: 301 lines"]),
        ("def f():\n" + "    x = 1\n" * 59, []),  # 60 lines
        (_LONG_FUNCTION, ["pkg.a.f: 61 lines"]),
        (f"x = '{'y' * 94}'\n", []),  # 100 characters
        (f"x = '{'y' * 95}'\n", ["pkg.a:1: 101 characters"]),
        (f"x = 1\n# {'z' * 99}\n", ["pkg.a:2: 101 characters"]),  # a comment counts too
        ("x = [1, 2]  # fmt: skip\n", ["pkg.a:1: # fmt: skip"]),
        ("# fmt: off\nx = [1,2]\n# fmt: on\n", ["pkg.a:1: # fmt: off"]),
        ("x = 1  # noqa: E501 # fmt:skip\n", ["pkg.a:1: # noqa: E501 # fmt:skip"]),
        ('x = "# fmt: skip"  # a string that names it is no switch\n', []),
    ],
)
def test_checker_finds_long_files_functions_lines_and_formatter_switches(
    tmp_path: Path, source: str, expected: list[str]
) -> None:
    root = _write_package(tmp_path, {"__init__.py": "", "a.py": source})
    assert size_violations(root) == expected


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
