"""How sure a comparison may be: each variant's mean score with a 95% interval, and the interval of its
difference to the best, from a **paired bootstrap over eval rows and seeds**.

Every variant is scored on the same eval rows, so their scores are paired: a hard row is hard for all of
them. Resampling the rows once per replicate and applying the same resample to every variant keeps that
pairing, and the interval of a *difference* is then much narrower than two separate intervals would suggest
("Adding Error Bars to Evals", Miller 2024, §4: paired differences). Seeds are the second level: in each
replicate the seeds are resampled too (the same draw for every variant: seed s gives every variant the same
data order), so that the spread between training runs counts as well as the spread between rows.

A metric is computed from per-row sufficient statistics (:mod:`tunelab.metrics`): a replicate sums each
seed's statistics under the row weights and applies the metric, so corpus metrics (chrF, BLEU, macro-F1)
are resampled as what they are, not as a mean of per-row scores.

A variant is **tied** with the best when the 95% interval of its difference to the best reaches 0: the data
cannot tell them apart. The percentile interval of 2,000 replicates is used; its agreement with
``scipy.stats.bootstrap`` on the one-seed case is a test (tests/test_stats.py).

Forgetting (KL to the base model) is one number per run: its interval is Student's t over seeds (none with
one seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab import metrics

LEVEL, RESAMPLES = 0.95, 2000
NO_INTERVAL = "no interval: one seed and no per-row answers"


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float | None = None
    hi: float | None = None

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class Verdict:
    best: str | None  #: the variant with the highest mean
    scores: dict[str, Interval]  #: each variant's mean and its interval
    differences: dict[str, Interval]  #: each variant's difference to the best (best - best = 0)
    tied: list[str]  #: the best and every variant whose difference interval reaches 0, best first
    how: str  #: what was resampled, for the report ("60 eval rows × 3 seeds, paired")


def paired_bootstrap(
    rows: dict[str, np.ndarray],
    metric: str,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    by_rows: bool = True,
) -> Verdict:
    """``rows``: per variant, its per-row statistics of ``metric`` for each seed it ran, shape
    (seeds, rows, k); every variant on the same rows in the same order. Without per-row answers
    (``by_rows=False``) each seed is one "row" holding that seed's totals, and only seeds are resampled."""
    if not rows:
        return Verdict(None, {}, {}, [], "nothing to compare")
    if not by_rows and max(a.shape[0] for a in rows.values()) == 1:  # one number per variant: no spread known
        point = {x: float(metrics.total(metric, a.sum(1)).mean()) for x, a in rows.items()}
        best = min(point, key=lambda x: (-point[x], x))
        return Verdict(
            best,
            {x: Interval(v) for x, v in point.items()},
            {x: Interval(v - point[best]) for x, v in point.items()},
            [x for x in sorted(point, key=lambda x: x != best) if point[x] == point[best]],
            NO_INTERVAL,
        )
    n = {a.shape[1] for a in rows.values()}
    if len(n) != 1:
        raise ValueError(f"variants were scored on different numbers of rows ({sorted(n)}): they cannot be paired")
    (n,) = n
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)  # (B, n): a row resample
    kmax = max(a.shape[0] for a in rows.values())
    draw = rng.random((resamples, kmax))  # one seed draw per replicate, shared by every variant
    point, boot = {}, {}
    for name, a in rows.items():
        k = a.shape[0]
        per_seed = metrics.total(metric, a.sum(1))  # (k,)
        point[name] = float(per_seed.mean())
        sums = np.einsum("bn,knm->bkm", weights, a)  # (B, k, m)
        scores = metrics.total(metric, sums)  # (B, k)
        pick = np.minimum((draw[:, :k] * k).astype(int), k - 1)  # (B, k): seeds drawn with replacement
        boot[name] = np.take_along_axis(scores, pick, axis=1).mean(1)  # (B,)
    best = min(point, key=lambda x: (-point[x], x))  # ties of the means: by name, so the order is fixed
    tail = (1 - level) / 2 * 100

    def interval(mean: float, values: np.ndarray) -> Interval:
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return Interval(mean, float(lo), float(hi))

    scores = {x: interval(point[x], boot[x]) for x in rows}
    diffs = {x: interval(point[x] - point[best], boot[x] - boot[best]) for x in rows}
    tied = [best] + [x for x in rows if x != best and diffs[x].hi >= 0]
    counts = sorted({a.shape[0] for a in rows.values()})
    seeds = f"{'/'.join(map(str, counts))} seed{'s' if counts != [1] else ''}"
    how = f"{n} eval rows × {seeds}, paired" if by_rows else f"{seeds}, rows not resampled"
    return Verdict(best, scores, diffs, tied, how)


def seed_interval(values: list[float], level: float = LEVEL) -> Interval:
    """The mean of one number per seed, with Student's t interval (none with one seed)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return Interval(float(v.mean()) if len(v) else float("nan"))
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half))
