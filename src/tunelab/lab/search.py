"""A fair search over each strategy's own knobs: **successive halving** on the dev split.

A variant of a grid may carry a ``search:`` space over its knobs::

    - name: lora
      strategy: {name: lora, r: 16}
      search: {lr: {log_uniform: [1.0e-5, 1.0e-2]}, r: [8, 16, 32]}

A knob is ``lr`` (the rate everything in the variant trains at: ``training.lr``, and the strategy's own
``lr`` where its spec sets one), an option of one of the variant's strategies by its bare name (``r``,
``reduction_factor``, ``top``, ``shots``, ...), or a dotted config key (``training.warmup_steps``). Values are a
list, or a range ``{log_uniform: [lo, hi]}`` / ``{uniform: [lo, hi]}`` that gives evenly spaced points (in
log space for log_uniform), ``n`` of them or as many as fill the grid's ``search.candidates``.

The search (Jamieson & Talwalkar 2016; Li et al. 2018, "Hyperband", for η): every candidate trains ``r₀``
steps, the best ``1/η`` by the dev metric (the primary metric; ties by dev loss, then by order) **continue
from their checkpoints** to ``η·r₀``, and so on until one is left, which trains to the comparison's budget
``R`` (``training.max_steps``). ``r₀ = R / η^⌈log_η N⌉`` (at least ``search.min_steps``), so the first rung
costs about one full run, as every later one does. The learning-rate schedule's horizon is always ``R``: a
candidate cut at step ``r`` has had exactly the first ``r`` steps of the run it would have had, so continuing
equals having trained longer from the start (a test checks the weights bit for bit). Every searched variant
gets the same number of candidates (``search.candidates``) and so the same compute.

Prompt baselines (no training) are halved on the number of dev rows scored instead of steps: ``m₀`` rows,
then ``η·m₀``, up to the whole dev split.

Candidates are scored on the dev split (``eval.split: dev``; the eval file is never opened) without
forgetting measured. The chosen knobs then run as the variant itself, once per seed, scored on the eval split.

Layout: ``<comparison>/search/<variant>/<candidate>/`` (an ordinary run dir) and
``<comparison>/search/<variant>/state.json`` (the candidates, each rung's scores, the choice). Running the
comparison again continues: scored rungs are kept, a candidate killed mid-rung resumes from its checkpoint,
a failed candidate is recorded (it ranks last) and the search goes on.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunelab.config import ConfigError, RunConfig
from tunelab.errors import RunError, first_line
from tunelab.integrity import read_json
from tunelab.rundir import CHECKPOINTS, MARKER, SUMMARY
from tunelab.runtime import write_json_atomic
from tunelab.schema import StrictModel

SEARCH, STATE = "search", "state.json"
FAIR_KNOBS = ("data", "tasks", "training.seed", "training.max_steps", "training.max_tokens", "training.epochs")


class SearchOptions(StrictModel):
    eta: int = Field(
        3, ge=2, description="Keep the best 1/eta of the candidates at each rung (successive halving)."
    )
    candidates: int = Field(
        6,
        ge=1,
        description="Candidates per searched variant: every strategy gets the same number, so the same compute.",
    )
    min_steps: int = Field(1, ge=1, description="The least steps a candidate trains before its first cut.")
    min_rows: int = Field(4, ge=1, description="The least dev rows a prompt candidate is scored on before a cut.")
    seed: int = Field(0, description="Seed of the draw when a space has more points than `candidates`.")
    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: candidates one process at a time, here (no extra dependency). ray: Ray Tune trials "
        "under its ASHA scheduler, in parallel, here or on a Ray cluster (pip install 'tunelab[ray]').",
    )
    address: str | None = Field(
        None, description="ray: the cluster to join (`auto`, or ray://HOST:10001); default: start one here."
    )
    cpus: int | None = Field(None, ge=1, description="ray: CPUs of the instance started here (default: all).")
    cpus_per_trial: float = Field(1.0, gt=0, description="ray: CPUs each candidate holds.")
    gpus_per_trial: float = Field(0.0, ge=0, description="ray: GPUs each candidate holds (a share, e.g. 0.5).")
    concurrent: int | None = Field(
        None, ge=1, description="ray: candidates at once (default: as many as the resources allow)."
    )


@dataclass
class Candidate:
    id: str
    knobs: dict[str, Any]  #: knob -> value, as the space gave it
    sets: list[str] = field(default_factory=list)  #: the `--set` overrides that make it


def _points(knob: str, spec: Any, fill: int) -> list[Any]:
    """A knob's values from its space spec; a range is ``fill`` points unless it says ``n``."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"search.{knob}: an empty list; give at least one value")
        return list(spec)
    if isinstance(spec, dict) and len({"log_uniform", "uniform"} & set(spec)) == 1 and set(spec) <= {
        "log_uniform", "uniform", "n"
    }:  # fmt: skip
        kind = "log_uniform" if "log_uniform" in spec else "uniform"
        bounds, n = spec[kind], spec.get("n", fill)
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
        if not ok or not bounds[0] < bounds[1]:
            raise ValueError(f"search.{knob}: {kind} takes [low, high] with low < high, got {bounds}")
        if kind == "log_uniform" and bounds[0] <= 0:
            raise ValueError(f"search.{knob}: log_uniform needs bounds above 0, got {bounds}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"search.{knob}: n must be a number of points (1 or more), got {n}")
        lo, hi = (math.log(b) for b in bounds) if kind == "log_uniform" else bounds
        xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [(lo + hi) / 2]
        return [float(f"{(math.exp(x) if kind == 'log_uniform' else x):.4g}") for x in xs]
    raise ValueError(
        f"search.{knob}: give a list of values or a range ({{log_uniform: [low, high]}} or "
        f"{{uniform: [low, high]}}, optionally with n), got {spec!r}"
    )


def knob_sets(knob: str, value: Any, cfg: RunConfig) -> list[str]:
    """The overrides that set ``knob`` to ``value`` in a variant whose config is ``cfg``."""
    if "." in knob:
        if any(knob == k or knob.startswith(k + ".") for k in FAIR_KNOBS):
            raise ValueError(f"search.{knob}: data, seed and budget are the comparison's, never searched")
        return [f"{knob}={json.dumps(value)}"]
    if knob == "lr":
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"search.lr: a learning rate must be a number above 0, got {value!r}")
        own = [f"strategy.{c.name}.lr={json.dumps(value)}" for c in cfg.strategy if c.lr is not None]
        return [f"training.lr={json.dumps(value)}", *own]
    for c in cfg.strategy:
        if knob in type(c).model_fields and knob != "name":
            return [f"strategy.{c.name}.{knob}={json.dumps(value)}"]  # JSON: a valid YAML value, quoted
    have = sorted({k for c in cfg.strategy for k in type(c).model_fields if k != "name"})
    raise ValueError(
        f"search.{knob}: no strategy of this variant ({'+'.join(cfg.strategy_names())}) has it; its knobs: lr, "
        f"{', '.join(k for k in have if k != 'lr')} (or a dotted config key such as training.warmup_steps)"
    )


def candidates(space: dict[str, Any], opts: SearchOptions, cfg: RunConfig) -> list[Candidate]:
    """Every candidate of a variant's space: lists crossed, ranges spread to fill ``opts.candidates``; a
    space with more points than that is drawn from (seeded), so every searched variant gets the same number."""
    if not isinstance(space, dict) or not space:
        raise ValueError("search: give a mapping of knob -> values, e.g. {lr: {log_uniform: [1.0e-5, 1.0e-2]}}")
    fixed = math.prod(len(v) for v in space.values() if isinstance(v, list) and v) or 1
    ranges = sum(1 for v in space.values() if not isinstance(v, list))
    fill = max(1, round((opts.candidates / fixed) ** (1 / ranges))) if ranges else 1
    values = {k: _points(k, v, fill) for k, v in space.items()}
    combos = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    if len(combos) > opts.candidates:
        combos = sorted(random.Random(opts.seed).sample(range(len(combos)), opts.candidates))
        combos = [dict(zip(values, c, strict=True)) for i, c in enumerate(itertools.product(*values.values()))
                  if i in set(combos)]  # fmt: skip
    out = []
    for i, knobs in enumerate(combos):
        sets = [s for k, v in knobs.items() for s in knob_sets(k, v, cfg)]
        out.append(Candidate(f"c{i}", knobs, sets))
    return out


def rungs(n: int, budget: int, eta: int, least: int) -> list[tuple[int, int]]:
    """(budget, candidates) per rung: ``n`` candidates at ``r₀``, ``n // η`` (at least 1) at ``η·r₀``, ...;
    the last one alone at the full ``budget``."""
    depth = math.ceil(math.log(n, eta) - 1e-9) if n > 1 else 0
    r0 = min(budget, max(least, math.ceil(budget / eta**depth)))
    plan, r = [], r0
    while n > 1 and r < budget:
        plan.append((r, n))
        n, r = max(1, n // eta), min(budget, r * eta)
    plan.append((budget, n))
    return plan


def compute(plan: list[tuple[int, int]]) -> int:
    """Steps (or rows) the plan spends, each candidate continuing from where it was cut."""
    spent, before = 0, 0
    for r, n in plan:
        spent += n * (r - before)
        before = r
    return spent


# ----------------------------------------------------------------------------- running one variant's search

#: runs one candidate: (config, resume, stop_at, overwrite) -> its error line or None
Runner = Callable[[RunConfig, bool, int | None, bool], str | None]


def _dev_result(run_dir: Path) -> dict[str, Any] | None:
    """A candidate's dev scores as its last rung left them: steps trained, metric, loss; None before any."""
    if not (run_dir / SUMMARY).is_file():
        return None
    s = read_json(run_dir / SUMMARY)
    ev = s.get("eval") or {}
    metric = ev.get("primary")
    return {
        "steps": (s.get("train") or {}).get("steps", 0),
        "rows": ev.get("examples"),
        "metric": metric,
        "score": ev.get(metric) if metric else None,
        "loss": ev.get("loss"),
        "wall_s": s.get("wall_time_s"),
    }


def search_variant(
    out: Path,
    name: str,
    cands: list[Candidate],
    make: Callable[[Candidate, dict], RunConfig],
    opts: SearchOptions,
    budget: int,
    trains: bool,
    runner: Runner,
) -> Candidate:
    """Run (or continue) variant ``name``'s search; returns the chosen candidate. ``make(candidate, extra)``
    builds a candidate's config (its run dir under ``search/<name>/``); ``extra`` adds ``eval.max_examples``
    for a prompt rung. ``budget``: steps, or dev rows when the variant does not train."""
    home = out / SEARCH / name
    home.mkdir(parents=True, exist_ok=True)
    path = home / STATE
    state = read_json(path) if path.is_file() else {}
    if state.get("candidates") not in (None, [c.knobs for c in cands]):
        raise RunError(
            f"{path}: this search ran with other candidates; give the changed variant a new name, or choose a new "
            "output_dir"
        )
    plan = rungs(len(cands), budget, opts.eta, opts.min_steps if trains else opts.min_rows)
    state.update(candidates=[c.knobs for c in cands], unit="steps" if trains else "dev rows", plan=plan)
    state.setdefault("rungs", [])
    alive = list(range(len(cands)))
    for i, (r, _) in enumerate(plan):
        if len(state["rungs"]) <= i:
            state["rungs"].append({"budget": r, "candidates": alive, "scores": {}})
        rung = state["rungs"][i]
        for c in alive:
            if str(c) in rung["scores"]:
                continue
            rung["scores"][str(c)] = _run_candidate(home / cands[c].id, cands[c], make, r, budget, trains, runner)
            write_json_atomic(path, state)
            tag = rung["scores"][str(c)]
            said = tag.get("error") or f"{tag['metric']} {tag['score']:.3f}, loss {tag['loss']:.4f}"
            print(f"compare: {name}: search rung {i + 1}/{len(plan)} ({r} {state['unit']}): {cands[c].id} "
                  f"{cands[c].knobs}: {said}", flush=True)  # fmt: skip
        alive = _best(rung["scores"], alive, plan[i + 1][1] if i + 1 < len(plan) else 1)
    state["chosen"] = alive[0]
    state["spent"] = compute(plan)
    state["exhaustive"] = len(cands) * budget
    write_json_atomic(path, state)
    return cands[alive[0]]


def _best(scores: dict[str, dict], alive: list[int], keep: int) -> list[int]:
    """The ``keep`` best by dev metric (higher first), then dev loss (lower first), then order; a failed
    candidate ranks last."""

    def key(c: int) -> tuple:
        s = scores[str(c)]
        if "error" in s or s.get("score") is None:
            return (1, 0.0, 0.0, c)
        return (0, -s["score"], s["loss"] if s.get("loss") is not None else math.inf, c)

    return sorted(alive, key=key)[:keep]


def _run_candidate(
    run_dir: Path, cand: Candidate, make, r: int, budget: int, trains: bool, runner: Runner
) -> dict[str, Any]:
    """Train (or continue) one candidate to ``r`` steps, or score it on ``r`` dev rows; its dev result."""
    done = _dev_result(run_dir) if trains else None
    if done is not None and done["steps"] == r:  # it finished this rung before the comparison stopped
        return done
    if trains:
        cfg = make(cand, {})
        resume = (run_dir / MARKER).is_file() and (run_dir / CHECKPOINTS).is_dir()
        error = runner(cfg, resume, r if r < budget else None, False)
    else:
        cfg = make(cand, {"eval": {"max_examples": r}})
        error = runner(cfg, False, None, True)  # a fresh scoring at each rung: more rows, nothing trained
    if error is not None:
        return {"error": error}
    try:
        result = _dev_result(run_dir)
    except RunError as e:
        return {"error": first_line(e)}
    return result if result is not None else {"error": f"{run_dir}: no summary after the run"}


def stop_at(step: int):
    """A Trainer callback that ends training after optimizer step ``step`` and saves a checkpoint there (the
    schedule keeps its horizon: the run is cut, not shortened)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = control.should_save = True
            return control

        def on_train_begin(self, args, state, control, **kwargs):  # resumed at the cut: no step past it
            if state.global_step >= step:
                control.should_training_stop = True
            return control

    return StopAt()


def dev_size(cfg: RunConfig) -> int:
    """How many rows the dev split of ``cfg.data`` has (a prompt search's budget, in rows)."""
    from tunelab.data import dev_rows, read_rows_with_lines

    data = cfg.data
    if data.dev:
        return len(read_rows_with_lines(data.dev)[0])
    n = len(read_rows_with_lines(data.train)[0])
    if data.eval_split:
        n -= max(1, round(n * data.eval_split))
    return dev_rows(data, n, data.train)


def read_searches(out: Path) -> dict[str, dict[str, Any]]:
    """Each searched variant's state (see :func:`search_variant`), by variant; {} without a search."""
    home = out / SEARCH
    if not home.is_dir():
        return {}
    found = {}
    for path in sorted(home.glob(f"*/{STATE}")):
        try:
            found[path.parent.name] = read_json(path)
        except RunError:
            continue  # a damaged state: the report shows the variant's rows without its search
    return found


def check_space(space: Any, opts: SearchOptions, cfg: RunConfig, where: str) -> list[str]:
    """Problems of a variant's search space, one line each (empty when it is good)."""
    try:
        candidates(space, opts, cfg)
    except (ValueError, ConfigError) as e:
        return [f"{where}: {first_line(e)}"]
    return []
