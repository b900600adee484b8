"""A variant's search space: its knobs (``lr``, a strategy's own option by its bare name, a dotted config
key), their values (a list, or a ``log_uniform`` / ``uniform`` range spread into points), and the candidates
they make: the same number for every searched variant (``search.candidates``), each one a list of ``--set``
overrides of the variant's config. The search itself is tunelab.lab.search."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from tunelab.config import RunConfig


class Draw(Protocol):
    """How many candidates a space makes, and the seed of the draw when it has more points (the grid's
    ``search`` options: tunelab.lab.search.SearchOptions)."""

    candidates: int
    seed: int


#: what every variant of a comparison shares: never set by a variant, never searched
FAIR = ("data", "tasks", "training.seed", "training.max_steps", "training.max_tokens", "training.epochs")


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
        if any(knob == k or knob.startswith(k + ".") for k in FAIR):
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


def candidates(space: dict[str, Any], opts: Draw, cfg: RunConfig) -> list[Candidate]:
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
