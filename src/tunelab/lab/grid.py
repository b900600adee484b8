"""A comparison's grid: the base config, its named variants (each validated, none allowed to change the data,
seed or budget), the prompt baseline row, and reading a comparison directory back (tunelab.lab.compare
runs it, tunelab.lab.report reports it)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from tunelab.config import ConfigError, RunConfig, TrainingConfig, load_config, parse_override, safe_load
from tunelab.errors import RunError, first_line
from tunelab.integrity import read_json
from tunelab.lab.search import SEARCH, SearchOptions
from tunelab.lab.space import FAIR, candidates
from tunelab.schema import StrictModel

VARIANTS, STATUS, GRID = "variants", "status.json", "grid.yaml"


class Variant(StrictModel):
    model_config = {**StrictModel.model_config, "extra": "allow"}
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
        max_length=100,
        description="Names the variant's run dir and row.",
    )
    set: list[str] = Field(default_factory=list, description="`key=value` overrides, as `tunelab train --set`.")
    search: dict[str, Any] | None = Field(
        None,
        description="A space over the variant's own knobs (lr, a strategy option such as r, or a dotted key), "
        "searched by successive halving on the dev split (tunelab.lab.search); the chosen knobs then run.",
    )


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
    seeds: int | list[int] | None = Field(
        None,
        description="Train every variant once per seed: N (the base's training.seed and the N-1 after it) or a "
        "list of seeds. Each run is its own run dir (variants/<name>/seed-<s>); the report gives means with 95% "
        "intervals and calls variants within noise of the best tied. Default: one run, at the base's seed.",
    )
    report: ReportOptions = Field(default_factory=ReportOptions)
    search: SearchOptions = Field(
        default_factory=SearchOptions, description="How variants with a `search:` space are searched."
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"seeds: {v}: give a number of seeds (1 or more) or a list of seeds")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"seeds: {v}: give a non-empty list of distinct seeds")
        return v

    def seed_list(self) -> list[int] | None:
        """The seeds every variant runs with; None for one run at the base's seed (the plain layout)."""
        if self.seeds is None:
            return None
        if isinstance(self.seeds, list):
            return list(self.seeds)
        first = (self.base.get("training") or {}).get("seed", TrainingConfig.model_fields["seed"].default)
        return [int(first) + i for i in range(self.seeds)]

    def runs(self) -> dict[str, list[tuple[int | None, str]]]:
        """Each variant's runs: (seed, key), the key naming its run dir under ``variants/`` and its entry in
        ``status.json``: the variant's name, or ``<name>/seed-<s>`` when the grid has seeds."""
        seeds = self.seed_list()
        return {
            v.name: [(None, v.name)] if seeds is None else [(s, f"{v.name}/seed-{s}") for s in seeds]
            for v in self.variants
        }


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
    """The grid and every run's validated config (its output dir inside the comparison dir), by run key
    (:meth:`Grid.runs`: the variant's name, or ``<name>/seed-<s>`` with seeds)."""
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
    grid = _normalized(grid)
    configs, problems = {}, []
    for v in grid.variants:
        try:
            cfg, adds_tasks = variant_dict(grid, v)
        except ValueError as e:
            problems.append(f"{path}: {e}")
            continue
        try:
            for seed, key in grid.runs()[v.name]:
                configs[key] = build(grid, v, cfg, VARIANTS, key, seed)
        except ConfigError as e:
            problems += [f"{path}: variant {v.name}: {p}" for p in e.problems]
            continue
        if adds_tasks and comparison_task(grid.base, configs[key]) is None:
            problems.append(
                f"{path}: variant {v.name}: tasks must include the comparison's own data (base `data`, the same "
                "train and eval) as one of them: the row is scored on it, the other tasks are extra training"
            )
        if v.search is not None:
            problems += [f"{path}: variant {v.name}: {p}" for p in _check_search(grid, v, cfg, configs[key])]
    problems += _same_batch(path, grid, configs)
    if problems:
        raise ConfigError(problems, str(path))
    return grid, configs


def is_grid(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a comparison grid (a mapping with ``variants:``) rather than a run config; a file
    that cannot be read or parsed is not, so that the run config's loader reports it with its line."""
    try:
        raw = safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "variants" in raw


def check_grid(path: str | os.PathLike, overrides: list[str] | None = None) -> str:
    """``tunelab validate`` on a grid: every variant's every run validated as ``tunelab compare`` would
    (nothing run, nothing written); one line saying what the comparison holds."""
    if overrides:
        raise ConfigError(
            [f"{path}: --set changes a run config; in a grid, put the key under `base:` or a variant's `set:`"]
        )
    grid, configs = load_grid(path)
    seeds = grid.seed_list()
    searched = [v.name for v in grid.variants if v.search is not None]
    parts = [
        f"comparison of {len(grid.variants)} variants ({', '.join(v.name for v in grid.variants)})",
        f"{len(seeds)} seeds" if seeds else "",
        f"searching {', '.join(searched)}" if searched else "",
        f"{len(configs)} runs",
        f"output_dir {grid.output_dir}",
    ]
    return f"{path}: ok ({', '.join(p for p in parts if p)})"


def variant_dict(grid: Grid, v: Variant) -> tuple[dict, bool]:
    """The variant's config as plain data (the base with its keys merged in, before its ``set``), and whether
    it adds tasks beside the comparison's own data. Refuses (ValueError) a variant that changes what makes
    the comparison fair."""
    extra = {k: val for k, val in (v.__pydantic_extra__ or {}).items()}
    unfair = [k for k in FAIR if _touches(extra, v.set, k)]
    # more tasks beside the comparison's own (multitask, continual): allowed, checked by load_grid
    adds_tasks = "tasks" in extra and "data" in grid.base and "tasks" not in grid.base
    if adds_tasks and not any(_set_key(s) == "tasks" for s in v.set):
        unfair = [k for k in unfair if k != "tasks"]
    if unfair:
        raise ValueError(
            f"variant {v.name}: sets {', '.join(unfair)}; data, seed and budget belong to `base` so that every "
            "variant is compared on the same ones"
        )
    cfg = _merge(grid.base, extra)
    if adds_tasks:
        cfg.pop("data")
    return cfg, adds_tasks


def build(grid: Grid, v: Variant, cfg: dict, folder: str, key: str, seed: int | None, sets=(), extra=None):
    """One run's validated config: the variant's ``cfg`` (:func:`variant_dict`) with ``extra`` merged in and
    its ``set``, then ``sets``, then the seed applied; its run dir ``<output_dir>/<folder>/<key>``."""
    cfg = _merge(cfg, {**(extra or {}), "output_dir": str(Path(grid.output_dir) / folder / key)})
    seeded = [f"training.seed={seed}"] if seed is not None else []
    return load_config(cfg, [*v.set, *sets, *seeded])


#: what a search candidate changes besides its knobs: scored on the dev split, no forgetting measured
CANDIDATE = {"eval": {"split": "dev", "before": False}, "forgetting": {"enabled": False}}


def candidate_config(grid: Grid, v: Variant, cand, extra: dict | None = None) -> RunConfig:
    """A search candidate's config: the variant at the grid's first seed, with the candidate's knobs."""
    cfg, _ = variant_dict(grid, v)
    seed = (grid.seed_list() or [None])[0]
    return build(grid, v, cfg, f"{SEARCH}/{v.name}", cand.id, seed, cand.sets, _merge(CANDIDATE, extra or {}))


def _check_search(grid: Grid, v: Variant, cfg: dict, run: RunConfig) -> list[str]:
    """A searched variant's problems: its space (knobs, values), and every candidate's config."""
    if run.mode != "single":
        return [f"search: searches mode single variants; this one is {run.mode}"]
    if run.training.max_steps is None:
        return ["search: successive halving cuts candidates at steps: give the base training.max_steps"]
    try:
        cands = candidates(v.search, grid.search, run)
    except ValueError as e:
        return [first_line(e)]
    problems = []
    for c in cands:
        try:
            candidate_config(grid, v, c)
        except ConfigError as e:
            problems += [f"search candidate {c.knobs}: {p}" for p in e.problems]
    return problems


def _normalized(grid: Grid) -> Grid:
    """The grid as it runs: the baseline row added (unless it has one), and with a search, a dev split."""
    return _with_dev(_with_baseline(grid))


def _with_dev(grid: Grid) -> Grid:
    """With a search, choices need a dev split: the base's ``data`` gets ``dev_split: auto`` unless it gives
    ``dev`` or ``dev_split``, and so does each variant task that is the comparison's own data, so that every
    variant trains on the same rows and none on the dev rows."""
    data = grid.base.get("data")
    if not any(v.search for v in grid.variants) or not isinstance(data, dict) or data.get("dev") or data.get(
        "dev_split"
    ):  # fmt: skip
        return grid
    base = _merge(grid.base, {"data": {"dev_split": "auto"}})
    variants = []
    for v in grid.variants:
        extra = v.__pydantic_extra__ or {}
        tasks = extra.get("tasks")
        if isinstance(tasks, list):
            own = {k: val for k, val in data.items()}
            tasks = [
                {**t, "dev_split": "auto"} if isinstance(t, dict) and _same_data(t, own) else t for t in tasks
            ]
            v = Variant.model_validate({**v.model_dump(exclude_none=True), **extra, "tasks": tasks})
        variants.append(v)
    return grid.model_copy(update={"base": base, "variants": variants})


def _same_data(task: dict, data: dict) -> bool:
    return {k: x for k, x in task.items() if k not in ("name", "weight")} == data


def comparison_task(base: dict, cfg: RunConfig | dict) -> str | None:
    """The name of the task, among a variant's ``tasks``, that is the comparison's own data (the base's
    ``data``); None when the variant has no tasks or none of them is it."""
    from tunelab.config import DataConfig

    tasks = cfg.get("tasks") if isinstance(cfg, dict) else cfg.tasks
    if not tasks or not isinstance(base.get("data"), dict):
        return None
    try:
        own = DataConfig.model_validate(base["data"]).model_dump()
    except Exception:  # an invalid base data is reported by load_config
        return None
    for t in tasks:
        d = t if isinstance(t, dict) else t.model_dump()
        data = {k: v for k, v in d.items() if k not in ("name", "weight")}
        if DataConfig.model_validate(data).model_dump() == own:
            return d["name"]
    return None


def trains(cfg: RunConfig) -> bool:
    """Whether a variant trains at all (a prompt baseline does not)."""
    from tunelab.strategies.base import is_baseline

    return not is_baseline(cfg.strategy)


def _same_batch(path: Path, grid: Grid, configs: dict[str, RunConfig]) -> list[str]:
    """With a budget in steps or epochs, a variant with a larger batch would get more compute: every
    variant that trains must use the same batch (``batch_size × grad_accum``); a budget in tokens
    (``training.max_tokens``) lets them differ."""
    if (grid.base.get("training") or {}).get("max_tokens") is not None:
        return []
    batch = {n: c.training.batch_size * c.training.grad_accum for n, c in configs.items() if trains(c)}
    if len(set(batch.values())) <= 1:
        return []
    listed = ", ".join(f"{n} {b}" for n, b in batch.items())
    return [
        f"{path}: variants train on different batches (batch_size × grad_accum: {listed}); with a budget in steps "
        "or epochs that gives some more compute: keep them equal, or give the budget in tokens "
        "(base training.max_tokens)"
    ]


def _with_baseline(grid: Grid) -> Grid:
    """The grid with a zero-shot prompt baseline first, unless it has one or ``baseline: false``."""
    from tunelab.strategies import validate_strategy_specs
    from tunelab.strategies.base import is_baseline as baseline

    def is_baseline(v: Variant) -> bool:
        spec = (v.__pydantic_extra__ or {}).get("strategy", grid.base.get("strategy"))
        try:
            return baseline(validate_strategy_specs(spec))
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
    path = Path(out) / GRID
    if not path.is_file():
        raise RunError(f"{out} is not a comparison directory (no {GRID}); run `tunelab compare GRID.yaml` first")
    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
        return _normalized(Grid.model_validate(raw))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:  # ValidationError is a ValueError
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        why = getattr(e, "problem", None) or first_line(e)
        raise RunError(
            f"{where}: the comparison's copy of its grid is damaged ({why}); copy the grid you ran into it again"
        ) from None


def read_status(out: Path) -> dict[str, dict]:
    """Each variant's state as the last ``compare`` recorded it ({} before the first)."""
    path = Path(out) / STATUS
    if not path.is_file():
        return {}
    status = read_json(path, what="each variant's state, as compare recorded it")
    if not isinstance(status, dict) or not all(isinstance(v, dict) for v in status.values()):
        raise RunError(f"{path}: not a mapping of variant -> state; the file is damaged")
    return status
