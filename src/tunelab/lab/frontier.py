"""The numbers behind a comparison's recommendation: the Pareto front of task score against forgetting, and
the picks a person asks for ("best score"; "least forgetting / cheapest / fastest within N% of the best").

A variant is a :class:`Point`. Higher ``score`` is better; lower ``forgetting`` (KL to the base model),
``trainable`` (parameters) and ``wall_s`` are better. A metric that is None (a failed variant, a baseline
that trains nothing has no wall time of training, ...) leaves the point out of every pick that needs it.

"Within N% of the best score" is relative: ``score >= best × (1 - N/100)``. Ties are broken by the other
criteria in a fixed order, then by name, so the same numbers always give the same recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    name: str
    score: float | None  #: the task's headline score (exact match or accuracy), higher is better
    forgetting: float | None = None  #: KL to the base model on the retention set, lower is better
    trainable: int | None = None  #: trainable parameters
    wall_s: float | None = None  #: wall time of the run


def pareto_front(points: list[Point]) -> list[str]:
    """Names of the points that no other point dominates on (score up, forgetting down): a point is
    dominated when another has a score at least as high and forgetting at least as low, one of them
    strictly. Equal points are all on the front. In the input order."""
    known = [p for p in points if p.score is not None and p.forgetting is not None]

    def dominates(a: Point, b: Point) -> bool:
        return (
            a.score >= b.score
            and a.forgetting <= b.forgetting
            and (a.score > b.score or a.forgetting < b.forgetting)
        )

    return [p.name for p in known if not any(dominates(q, p) for q in known)]


def _order(p: Point, *keys: str) -> tuple:
    """Sort key: each named metric ascending (score descending), missing last, then the name."""
    out: list = []
    for k in keys:
        v = getattr(p, k)
        out += [v is None, 0 if v is None else (-v if k == "score" else v)]
    return (*out, p.name)


def recommend(points: list[Point], within: float = 5.0) -> dict[str, str | None]:
    """The picks, by variant name (None where no point has the metrics a pick needs):

    - ``best_score``: the highest score (ties: less forgetting, fewer trainable parameters, faster);
    - ``least_forgetting``: the least forgetting among points within ``within`` % of the best score;
    - ``cheapest``: the fewest trainable parameters among them (ties: higher score, faster);
    - ``fastest``: the shortest wall time among them (ties: higher score).
    """
    if not 0 <= within <= 100:
        raise ValueError(f"within must be a percentage from 0 to 100, got {within}")
    scored = [p for p in points if p.score is not None]
    if not scored:
        return {"best_score": None, "least_forgetting": None, "cheapest": None, "fastest": None}
    best = min(scored, key=lambda p: _order(p, "score", "forgetting", "trainable", "wall_s"))
    close = [p for p in scored if p.score >= best.score * (1 - within / 100)]

    def pick(metric: str, *ties: str) -> str | None:
        have = [p for p in close if getattr(p, metric) is not None]
        return min(have, key=lambda p: _order(p, metric, *ties)).name if have else None

    return {
        "best_score": best.name,
        "least_forgetting": pick("forgetting", "score", "trainable"),
        "cheapest": pick("trainable", "score", "wall_s"),
        "fastest": pick("wall_s", "score"),
    }
