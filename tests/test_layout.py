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


def imports(path: Path) -> set[str]:
    """tunelab modules ``path`` imports, at any depth (function-level imports count: they run too)."""
    mods, found = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tunelab")}
    return found


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


def test_no_module_over_400_lines_without_a_reason_at_its_top():
    long = []
    for name, path in modules().items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 400 and "Long because" not in doc:
            long.append(f"{name}: {len(text.splitlines())} lines")
    assert long == []


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
