"""A comparison's results, read back from its files alone: one row per run (a variant × a seed) and one
aggregate row per variant (means, 95% intervals, the difference to the best and whether it is tied with it:
:mod:`tunelab.lab.stats`). :mod:`tunelab.lab.report` writes them out.

Per run: its state (and error), task score (the primary metric, :mod:`tunelab.metrics`; a multi-task run's
mean over tasks; a continual run's average accuracy), forgetting (KL to the base model and base answers
reproduced on the retention set; the mean of the original tasks' scores after), trainable parameters and
their share, peak memory, tokens/s, training and wall time, the artefact's size on disk, and its training
loss curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tunelab import metrics
from tunelab.config import safe_load
from tunelab.errors import RunError, first_line
from tunelab.evaluate import headline, read_predictions
from tunelab.integrity import read_json
from tunelab.lab.frontier import Point
from tunelab.lab.grid import VARIANTS, Grid, comparison_task, read_grid, read_status
from tunelab.lab.stats import Verdict, paired_bootstrap, seed_interval
from tunelab.rundir import CONFIG, METRICS, MODEL, PREDICTIONS, SUMMARY

COLUMNS = [
    "variant", "seed", "row", "state", "runs", "strategy", "mode", "extra_tasks", "metric", "score", "score_lo",
    "score_hi", "vs_best", "vs_best_lo", "vs_best_hi", "tied_with_best", "kl_to_base", "kl_lo", "kl_hi",
    "base_answers_reproduced", "original_tasks_score", "trainable", "trainable_pct", "peak_mb", "tokens_per_s",
    "train_time_s", "wall_time_s", "artefact_mb", "error",
]  # fmt: skip
RUN, MEAN = "run", "mean"  #: a row of one run; a variant's aggregate row
#: averaged over a variant's runs in its aggregate row (the others come from its first run)
AVERAGED = ("base_answers_reproduced", "original_tasks_score", "peak_mb", "tokens_per_s", "train_time_s",
            "wall_time_s", "artefact_mb")  # fmt: skip


def _score(s: dict, task: str | None = None) -> tuple[str | None, float | None]:
    """The row's metric and score, as the run's mode reads its summary: the headline metric; a run over
    several tasks is scored on ``task`` (the comparison's own data, when the other tasks are extra training)
    or else on all of them (a multi-task run's mean, a continual run's average accuracy)."""
    from tunelab.modes import MODES

    return MODES[s.get("mode", "single")].row_score(s, task)


def _train_stats(s: dict) -> dict | None:
    """Training stats; a continual run's summed over its tasks."""
    t = s.get("train")
    if not isinstance(t, list):
        return t
    time_s, tokens = sum(x["train_time_s"] for x in t), sum(x["tokens_seen"] for x in t)
    return {"train_time_s": round(time_s, 2), "tokens_per_s": round(tokens / time_s, 2) if time_s else None}


def _forgetting(s: dict) -> tuple[float | None, float | None, float | None]:
    f = s.get("forgetting") or {}
    afters = [f["after"]] if "after" in f else [t["after"] for t in (f.get("per_task") or {}).values()]
    kl = sum(a["kl"] for a in afters) / len(afters) if afters else None
    rep = sum(a["exact_reproduction"] for a in afters) / len(afters) if afters else None
    originals = [headline(o["after"]) for o in (f.get("original_tasks") or {}).values()]
    orig = sum(v for _, v in originals if v is not None) / len(originals) if originals else None
    return kl, rep, orig


def _size_mb(path: Path) -> float:
    return (
        round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 2) if path.is_dir() else 0.0
    )


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """The training loss by step; a continual run's tasks one after the other (steps counted on)."""
    paths = [run_dir / METRICS] if (run_dir / METRICS).is_file() else []
    if not paths and (run_dir / "tasks").is_dir():  # continual: tasks/<i>-<name>/metrics.jsonl
        paths = sorted((run_dir / "tasks").glob(f"*/{METRICS}"), key=lambda p: int(p.parent.name.split("-")[0]))
    out: list[tuple[int, float]] = []
    for path in paths:
        offset = out[-1][0] if out else 0
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "loss" in r and "step" in r:
                out.append((offset + int(r["step"]), float(r["loss"])))
    return out


BROKEN = "broken"  #: a row's state when its variant finished but its files are missing or damaged


def _measured(run_dir: Path, base: dict) -> dict[str, Any]:
    """A finished variant's columns, from its summary.json and config.yaml."""
    s = read_json(run_dir / SUMMARY)
    t = _train_stats(s)
    kl, rep, orig = _forgetting(s)
    cfg = safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    task = comparison_task(base, cfg or {})
    metric, score = _score(s, task)
    split = task if task is not None else ("eval" if s.get("eval") else None)
    extra = [x["name"] for x in (cfg or {}).get("tasks") or [] if x["name"] != task] if task else []
    return {
        "strategy": "+".join(s["strategy"]),
        "mode": s["mode"],
        "extra_tasks": ", ".join(extra) or None,
        "score": score,
        "metric": metric,
        "split": split,
        "kl_to_base": kl,
        "base_answers_reproduced": rep,
        "original_tasks_score": orig,
        "trainable": s["parameters"]["trainable"],
        "trainable_pct": s["parameters"]["trainable_pct"],
        "peak_mb": s["memory"]["peak_mb"],
        "tokens_per_s": t["tokens_per_s"] if t else None,
        "train_time_s": t["train_time_s"] if t else 0.0,
        "wall_time_s": s["wall_time_s"],
        "artefact_mb": _size_mb(run_dir / MODEL),
    }


def _damage(run_dir: Path, e: Exception) -> str:
    """What is wrong with a finished variant's files, naming the file."""
    if isinstance(e, RunError):  # read_json: names the file and says missing / truncated
        return f"{e}; the variant finished but its record is lost: rerun it (delete {run_dir}) or restore the file"
    if isinstance(e, yaml.YAMLError):
        return f"{run_dir / CONFIG}: damaged ({first_line(e)})"
    what = f"no {e}" if isinstance(e, KeyError) else first_line(e)
    return f"{run_dir / SUMMARY}: not a summary tunelab wrote ({what})"


def collect(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Verdict]:
    """The runs (one row per variant × seed, in the grid's order), each variant's aggregate row, and the
    verdict of the paired bootstrap over the finished variants."""
    grid = read_grid(out)
    status, runs = read_status(out), []
    for name, keys in grid.runs().items():
        for seed, key in keys:
            run_dir = out / VARIANTS / key
            st = status.get(key, {"state": "not run"})
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            row.update(variant=name, seed=seed, row=RUN, state=st.get("state"), error=st.get("error"), runs=1)
            row.update(curve=loss_curve(run_dir), run_dir=run_dir, split=None)
            if st.get("state") == "done" or (run_dir / SUMMARY).is_file():
                try:
                    row.update(_measured(run_dir, grid.base), state="done")
                except (
                    RunError,
                    ValueError,
                    yaml.YAMLError,
                    KeyError,
                    TypeError,
                    IndexError,
                    AttributeError,
                ) as e:
                    # a finished run whose files were lost or damaged since: never shown as done
                    row.update(state=BROKEN, error=_damage(run_dir, e))
            runs.append(row)
    verdict = _verdict(runs)
    return runs, [_aggregate(grid, name, runs, verdict) for name in grid.runs()], verdict


def _verdict(runs: list[dict]) -> Verdict:
    """The paired bootstrap over every variant with a finished run, on the first finished run's metric: over
    eval rows and seeds where every such run kept its answers on the same rows, else over seeds only."""
    done = [r for r in runs if r["state"] == "done" and r["score"] is not None]
    if not done:
        return paired_bootstrap({}, "exact_match")
    metric = done[0]["metric"]
    by_variant: dict[str, list[dict]] = {}
    for r in done:
        by_variant.setdefault(r["variant"], []).append(r)
    stats = _row_stats(by_variant, metric)
    if stats is not None:
        return paired_bootstrap(stats, metric)
    # without every run's answers, each seed's score is one observation: stats (value, 1) give it back
    seeds = {v: np.array([[[r["score"], 1.0]] for r in rs]) for v, rs in by_variant.items()}
    return paired_bootstrap(seeds, "exact_match", by_rows=False)


def _row_stats(by_variant: dict[str, list[dict]], metric: str) -> dict[str, np.ndarray] | None:
    """Per variant, the per-row statistics of ``metric`` of each of its runs, (seeds, rows, k); None when
    some run did not keep its answers (an older run) or the runs were scored on different rows."""
    if metric not in metrics.METRICS:
        return None
    out = {}
    for variant, rs in by_variant.items():
        per_seed = []
        for r in rs:
            path = r["run_dir"] / PREDICTIONS / f"{r['split']}.jsonl" if r["split"] else None
            if path is None or not path.is_file():
                return None
            try:
                head, refs, preds = read_predictions(path)
            except (ValueError, KeyError, IndexError, UnicodeDecodeError):
                return None  # a damaged answers file: the run's score stands, its rows are not resampled
            per_seed.append(metrics.row_stats(metric, preds, refs, head.get("labels")))
        if len({a.shape for a in per_seed}) != 1:
            return None
        out[variant] = np.stack(per_seed)
    return out if len({a.shape[1:] for a in out.values()}) == 1 else None


def _aggregate(grid: Grid, name: str, runs: list[dict], verdict: Verdict) -> dict[str, Any]:
    """A variant's row over its runs: means with intervals where they exist."""
    mine = [r for r in runs if r["variant"] == name]
    done = [r for r in mine if r["state"] == "done"]
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(variant=name, row=MEAN, runs=f"{len(done)}/{len(mine)}", curve=mine[0]["curve"] if mine else [])
    if not done:
        first = mine[0] if mine else {}
        row.update(state=first.get("state", "not run"), error=first.get("error"))
        return row
    lost = [r for r in mine if r["state"] != "done"]
    row.update(state="done" if not lost else "partial", error="; ".join(_why(r) for r in lost) or None)
    for k in ("strategy", "mode", "extra_tasks", "metric", "trainable", "trainable_pct"):
        row[k] = done[0][k]
    for k in AVERAGED:
        vals = [r[k] for r in done if r[k] is not None]
        row[k] = sum(vals) / len(vals) if vals else None
    score, diff = verdict.scores.get(name), verdict.differences.get(name)
    if score is not None:
        row.update(score=score.mean, score_lo=score.lo, score_hi=score.hi)
        row.update(vs_best=diff.mean, vs_best_lo=diff.lo, vs_best_hi=diff.hi, tied_with_best=name in verdict.tied)
        row["best"] = name == verdict.best
    kls = [r["kl_to_base"] for r in done if r["kl_to_base"] is not None]
    if kls:
        kl = seed_interval(kls)
        row.update(kl_to_base=kl.mean, kl_lo=kl.lo, kl_hi=kl.hi)
    return row


def _why(r: dict) -> str:
    seed = f" seed {r['seed']}" if r["seed"] is not None else ""
    return f"{r['variant']}{seed} {r['state']}" + (f": {r['error']}" if r["error"] else "")


def unfinished(rows: list[dict]) -> dict[str, str]:
    """The runs that did not give a result, each with its state and error: failed, broken, not run. Keyed by
    the variant's name, or ``<name> seed <s>`` with seeds."""
    return {
        r["variant"] + (f" seed {r['seed']}" if r["seed"] is not None else ""): (
            f"{r['state']}: {r['error']}" if r["error"] else r["state"]
        )
        for r in rows
        if r["state"] != "done"
    }


def points(rows: list[dict]) -> list[Point]:
    """The aggregate rows as the recommendation's points (means)."""
    return [
        Point(r["variant"], r["score"], r["kl_to_base"], r["trainable"], r["wall_time_s"])
        for r in rows
        if r["state"] in ("done", "partial")
    ]
