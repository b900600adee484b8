"""A comparison's grid: the base config, its named variants (each validated, none allowed to change the data,
seed or budget), the prompt baseline row, and reading a comparison directory back (tunelab.lab.compare
runs it, tunelab.lab.report reports it)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from tunelab.config import ConfigError, RunConfig, load_config, parse_override, safe_load
from tunelab.errors import RunError, first_line
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
    return in_extra or any(_set_key(s) == key for s in sets)


def _set_key(item: str) -> str | None:
    """The key an override sets; None for a malformed one (load_config reports it, naming the variant)."""
    try:
        return parse_override(item)[0]
    except ConfigError:
        return None


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


def read_grid(out: Path) -> Grid:
    """The grid a comparison dir was run from (its copy in the dir), with the baseline row it ran."""
    if not (Path(out) / GRID).is_file():
        raise RunError(f"{out} is not a comparison directory (no {GRID}); run `tunelab compare GRID.yaml` first")
    return _with_baseline(Grid.model_validate(safe_load((Path(out) / GRID).read_text(encoding="utf-8"))))


def read_status(out: Path) -> dict[str, dict]:
    """Each variant's state as the last ``compare`` recorded it."""
    return json.loads((out / STATUS).read_text()) if (out / STATUS).is_file() else {}
