"""The code's shape (issue 8): read from the source with ``ast``, so it holds for every module, not only the
ones a test happens to import."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import tunelab

SRC = Path(tunelab.__file__).parent
# Modules that may name strategies: the strategies themselves, and the built-in demo (an example config).
MAY_NAME_STRATEGIES = {"strategies", "demo"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(path: Path, text: str | None = None) -> set[str]:
    """tunelab modules ``path`` imports, at any depth (function-level imports count: they run too), written
    absolutely, relatively (``from .base import X``, resolved against ``path``'s package) or as a string
    (``importlib.import_module("tunelab.x")``, ``__import__``), so no edge hides from the checks below."""
    mods, found = modules(), set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1 packages
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("tunelab"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tunelab")}
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("tunelab"):
                found.add(arg.value)
    return found


def _dynamic_import(func: ast.AST) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in {"import_module", "__import__"}


def test_the_import_finder_sees_relative_and_dynamic_imports():
    path = SRC / "lab" / "compare.py"  # a module of package tunelab.lab
    text = (
        "from .grid import load_grid\n"
        "from ..strategies import base\n"
        "from . import report\n"
        "import importlib\n"
        "def f():\n"
        "    importlib.import_module('tunelab.engine')\n"
        "    __import__('tunelab.session')\n"
    )
    found = imports(path, text)
    assert {"tunelab.lab.grid", "tunelab.strategies", "tunelab.strategies.base", "tunelab.lab.report"} <= found
    assert {"tunelab.engine", "tunelab.session"} <= found
    assert imports(path, "import importlib.util\nimportlib.util.find_spec('flash_attn')\n") == set()


def import_graph() -> dict[str, set[str]]:
    """Edges between tunelab modules. Importing ``a.b.c`` from outside package ``a.b`` runs ``a.b``'s
    ``__init__`` first, so it counts as an edge to ``a.b`` as well."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for dep in imports(path):
            parts = dep.split(".")
            for i in range(2, len(parts) + 1):
                target = ".".join(parts[:i])
                inside = name == target or name.startswith(target + ".")
                if target in mods and target != "tunelab" and (i == len(parts) or not inside):
                    deps.add(target)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere_in_tunelab():
    assert cycles(import_graph()) == []


# Modules allowed over 400 lines, each on purpose: a new long module fails until it is added here (with the
# reason its docstring gives), and one that shrinks below the limit must leave the list.
LONG = {
    "tunelab.config": "the one schema: every section's fields with their help texts, and its loader",
    "tunelab.data": "one rendering, masking and splitting path whose errors name the same file and line",
}


def test_no_module_over_400_lines_unless_listed_with_a_reason():
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name for name, n in lines.items() if n > 400}
    assert sorted(long - set(LONG)) == [], "add it to LONG with its reason, or split it"
    assert sorted(set(LONG) - long) == [], "no longer long: take it off LONG"
    for name in LONG:  # and the module says why at its top
        assert "Long because" in (ast.get_docstring(ast.parse(modules()[name].read_text())) or ""), name


def test_the_modes_table_and_the_config_agree():
    from tunelab.config import RunConfig
    from tunelab.modes import MODES

    allowed = set(typing.get_args(RunConfig.model_fields["mode"].annotation))
    assert allowed == set(MODES) and all(m.name == k for k, m in MODES.items())


def _decides_by_name(tree: ast.AST, names: set[str]) -> list[ast.AST]:
    """Code that decides by a strategy's name: ``x.name == "ewc"`` / ``x.name in {...}``, or a literal
    collection of two or more strategy names (``needs = {"retention", "replay"}``)."""

    def consts(node: ast.AST) -> set[str]:
        items = node.elts if isinstance(node, ast.Set | ast.List | ast.Tuple) else [node]
        return {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}

    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            operands = [n.left, *n.comparators]
            on_name = any(isinstance(o, ast.Attribute) and o.attr == "name" for o in operands)
            if on_name and any(consts(o) & names for o in operands):
                hits.append(n)
        elif isinstance(n, ast.Set | ast.List | ast.Tuple) and len(consts(n) & names) >= 2:
            hits.append(n)
    return hits


def test_no_module_outside_strategies_names_a_strategy_or_imports_one():
    """The engine, run modes, CLI and the rest ask the strategy stack; they never decide by a strategy's
    name or type (the old ``_needs_retention`` named retention, replay and ewc)."""
    from tunelab.strategies import registered

    names = set(registered())
    generic = {"tunelab.strategies", "tunelab.strategies.base", "tunelab.strategies.stack"}
    found = []
    for name, path in modules().items():
        if name == "tunelab" or name.split(".")[1] in MAY_NAME_STRATEGIES:
            continue
        tree = ast.parse(path.read_text())
        found += [f"{name}:{n.lineno} decides by strategy name" for n in _decides_by_name(tree, names)]
        found += [
            f"{name} imports {d}"
            for d in imports(path)
            if d.startswith("tunelab.strategies.") and d not in generic
        ]
    assert found == []


def test_the_name_check_catches_what_it_is_for():
    bad = ast.parse('needs = {"retention", "replay"}\nif s.name == "ewc": pass\nif s.name in ("lora",): pass')
    assert len(_decides_by_name(bad, {"retention", "replay", "ewc", "lora"})) == 3
    fine = ast.parse('rows = [{"prompt": p}]\nif col == "prompt": pass')
    assert _decides_by_name(fine, {"prompt"}) == []


#: Modules that read a finished run's results: they ask the run's mode (tunelab.modes.MODES[...]) what its
#: summary says, never branch on the mode's name.
READ_RESULTS = (
    "tunelab.cli",
    "tunelab.lab.report",
    "tunelab.lab.results",
    "tunelab.modelcard",
    "tunelab.readback",
)


def _decides_by_mode(tree: ast.AST, names: set[str]) -> list[ast.AST]:
    """``mode == "continual"``, ``"multitask" in s``, ``s["continual"]``, ``s.get("multitask")``."""

    def named(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare) and any(named(o) for o in [n.left, *n.comparators]):
            hits.append(n)
        elif isinstance(n, ast.Subscript) and named(n.slice):
            hits.append(n)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get":
            if n.args and named(n.args[0]):
                hits.append(n)
    return hits


def test_what_reads_results_asks_the_mode_and_never_branches_on_its_name():
    from tunelab.modes import MODES

    found = []
    for name in READ_RESULTS:
        tree = ast.parse(modules()[name].read_text())
        found += [f"{name}:{n.lineno} decides by mode name" for n in _decides_by_mode(tree, set(MODES))]
    assert found == []


def test_the_mode_check_catches_what_it_is_for():
    bad = ast.parse(
        'if s["mode"] != "single": pass\nif "continual" in s: c = s["continual"]\nm = s.get("multitask")'
    )
    assert len(_decides_by_mode(bad, {"single", "continual", "multitask"})) == 4
    fine = ast.parse('print(f"{s[\'mode\']}: outputs (continual.json)")\nMODES[s["mode"]].row_score(s)')
    assert _decides_by_mode(fine, {"single", "continual", "multitask"}) == []
