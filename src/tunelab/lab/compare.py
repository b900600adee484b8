"""``tunelab compare grid.yaml``: several strategies on the same data, seed and budget, one after the other,
in one comparison directory, and what each one cost and gave.

A grid is a base run config plus named variants::

    base: {model: ..., data: {train: ..., eval: ...}, training: {max_steps: 60, lr: 1e-3}}
    variants:
      - {name: zero-shot, strategy: {name: prompt-only}}
      - {name: lora, strategy: {name: lora, r: 16}}
      - {name: full, strategy: full, set: [training.lr=5e-5]}
      - {name: full+ewc, strategy: [full, {name: ewc, lam: 1000}], set: [training.lr=5e-5]}
    output_dir: runs/compare
    report: {within: 5}

A zero-shot prompt baseline (``prompt-only``: the untouched model, no training) is added as the first row
unless a variant is already a prompt baseline or the grid says ``baseline: false``.

Each variant is the base with the variant's keys merged in (mappings merge, other values replace) and its
``set`` overrides applied, exactly like ``tunelab train --set``. A variant may change strategies, mode,
learning rates and any other option, but not what makes the comparison fair: the data (``data``,
``tasks``), ``training.seed`` and the budget (``training.max_steps`` / ``training.epochs``) belong to the
base; a variant that sets them is refused, naming it. Every variant's config is validated before the first
one runs.

Layout: ``<dir>/grid.yaml`` (the grid as given), ``<dir>/variants/<name>/`` (an ordinary run dir) and
``<dir>/status.json`` (each variant's state: done, failed with its error line, or not run yet). Rerunning
the same command continues: finished variants are skipped, a variant killed mid-run resumes from its last
checkpoint (``--resume``), a failed one is tried again. A variant that fails is recorded with its error
and the others still run.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from tunelab.config import ConfigError, RunConfig, load_config, safe_load
from tunelab.errors import RunError, first_line
from tunelab.rundir import MARKER, SUMMARY
from tunelab.runtime import write_json_atomic
from tunelab.schema import StrictModel

FAIR = ("data", "tasks", "training.seed", "training.max_steps", "training.epochs")
VARIANTS, STATUS, GRID = "variants", "status.json", "grid.yaml"


class Variant(StrictModel):
    model_config = {**StrictModel.model_config, "extra": "allow"}
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="Names the variant's run dir and row.")
    set: list[str] = Field(default_factory=list, description="`key=value` overrides, as `tunelab train --set`.")


class ReportOptions(StrictModel):
    within: float = Field(
        5.0, ge=0, le=100, description="N in 'least forgetting / cheapest within N% of the best'."
    )


class Grid(StrictModel):
    base: dict[str, Any] = Field(description="The run config every variant starts from.")
    variants: list[Variant] = Field(min_length=1, description="Named variants of the base.")
    baseline: bool = Field(
        True,
        description="Add a zero-shot prompt baseline (the untouched model, no training) as the first row when "
        "no variant is a prompt baseline.",
    )
    output_dir: str = Field("runs/compare", description="The comparison directory.")
    report: ReportOptions = Field(default_factory=ReportOptions)


def _merge(into: dict, extra: dict) -> dict:
    out = copy.deepcopy(into)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _touches(extra: dict, sets: list[str], key: str) -> bool:
    head, _, rest = key.partition(".")
    in_extra = head in extra and (not rest or (isinstance(extra[head], dict) and rest in extra[head]))
    return in_extra or any(s.split("=", 1)[0].strip() == key for s in sets)


def load_grid(path: str | os.PathLike) -> tuple[Grid, dict[str, RunConfig]]:
    """The grid and every variant's validated run config (its output dir inside the comparison dir)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"grid file not found: {path.resolve()}"])
    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {getattr(e, 'problem', e)}"], str(path)) from None
    try:
        grid = Grid.model_validate(raw if isinstance(raw, dict) else {})
    except Exception as e:  # pydantic's ValidationError: one line per problem
        lines = [f"{path}: {'.'.join(map(str, x['loc']))}: {x['msg']}" for x in getattr(e, "errors", lambda: [])()]
        raise ConfigError(lines or [f"{path}: {first_line(e)}"], str(path)) from None
    names = [v.name for v in grid.variants]
    if len(set(names)) != len(names):
        raise ConfigError([f"{path}: variants: names repeat: {sorted({n for n in names if names.count(n) > 1})}"])
    grid = _with_baseline(grid)
    configs, problems = {}, []
    for v in grid.variants:
        extra = {k: val for k, val in (v.__pydantic_extra__ or {}).items()}
        unfair = [k for k in FAIR if _touches(extra, v.set, k)]
        if unfair:
            problems.append(
                f"{path}: variant {v.name}: sets {', '.join(unfair)}; data, seed and budget belong to `base` so "
                "that every variant is compared on the same ones"
            )
            continue
        cfg = _merge(grid.base, extra)
        cfg["output_dir"] = str(Path(grid.output_dir) / VARIANTS / v.name)
        try:
            configs[v.name] = load_config(cfg, v.set)
        except ConfigError as e:
            problems += [f"{path}: variant {v.name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, str(path))
    return grid, configs


def _with_baseline(grid: Grid) -> Grid:
    """The grid with a zero-shot prompt baseline first, unless it has one or ``baseline: false``."""
    from tunelab.strategies import get_strategy, validate_strategy_specs

    def is_baseline(v: Variant) -> bool:
        spec = (v.__pydantic_extra__ or {}).get("strategy", grid.base.get("strategy"))
        try:
            return any(get_strategy(c.name).baseline for c in validate_strategy_specs(spec))
        except (ValueError, TypeError):
            return False  # an invalid spec is reported with the variant's other problems

    if not grid.baseline or any(is_baseline(v) for v in grid.variants):
        return grid
    names = {v.name for v in grid.variants}
    name = next(n for n in ("zero-shot", "prompt-baseline", "zero-shot-baseline") if n not in names)
    first = Variant.model_validate({"name": name, "strategy": {"name": "prompt-only"}})
    return grid.model_copy(update={"variants": [first, *grid.variants]})


def _state(run_dir: Path) -> str:
    if (run_dir / SUMMARY).is_file():
        return "done"
    if (run_dir / MARKER).is_file():
        return "interrupted"
    return "new"


def compare(path: str | os.PathLike, *, callbacks: list | None = None) -> Path:
    """Run (or continue) every variant of the grid at ``path``; then write the report. Returns the
    comparison directory. Mirrors ``tunelab compare``."""
    from tunelab.lab.report import write_report
    from tunelab.run import train

    grid, configs = load_grid(path)
    out = Path(grid.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / GRID).write_text(Path(path).read_text(encoding="utf-8"))
    status_file = out / STATUS
    status: dict[str, dict] = json.loads(status_file.read_text()) if status_file.is_file() else {}
    for name, cfg in configs.items():
        run_dir = out / VARIANTS / name
        state = _state(run_dir)
        if state == "done":
            print(f"compare: {name}: done earlier, skipped", flush=True)
            status[name] = {"state": "done"}
            continue
        print(f"compare: {name}: {'resuming' if state == 'interrupted' else 'running'}", flush=True)
        try:
            train(cfg, resume=state == "interrupted", callbacks=callbacks)
            status[name] = {"state": "done"}
        except KeyboardInterrupt:
            status[name] = {"state": "interrupted"}
            write_json_atomic(status_file, status)
            raise
        except Exception as e:  # one variant's failure is a result, not the end of the comparison
            status[name] = {"state": "failed", "error": f"{type(e).__name__}: {first_line(e)}"}
            print(f"compare: {name}: failed: {status[name]['error']}", flush=True)
        write_json_atomic(status_file, status)
    write_json_atomic(status_file, status)
    write_report(out, within=grid.report.within)
    return out


def read_grid(out: Path) -> Grid:
    """The grid a comparison dir was run from (its copy in the dir), with the baseline row it ran."""
    if not (Path(out) / GRID).is_file():
        raise RunError(f"{out} is not a comparison directory (no {GRID}); run `tunelab compare GRID.yaml` first")
    return _with_baseline(Grid.model_validate(safe_load((Path(out) / GRID).read_text(encoding="utf-8"))))


def read_status(out: Path) -> dict[str, dict]:
    """Each variant's state as the last ``compare`` recorded it."""
    return json.loads((out / STATUS).read_text()) if (out / STATUS).is_file() else {}
