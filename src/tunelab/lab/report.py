"""The report of a comparison directory: ``results.csv``, ``report.md`` and a self-contained ``report.html``
(plots embedded as PNG data, no script, nothing fetched), rebuilt from the files alone by
``tunelab report DIR``.

Per variant (a row): its state (and error), task score (the headline metric: accuracy or exact match; a
multi-task run's mean over tasks; a continual run's average accuracy), forgetting (KL to the base model and
base answers reproduced on the retention set; the mean of the original tasks' scores after), trainable
parameters and their share, peak memory, tokens/s, training and wall time, the artefact's size on disk,
and its training loss curve. Plots: score vs forgetting with the Pareto front, score vs trainable
parameters (log scale), score vs wall time, and every loss curve on one chart. The recommendation comes
from :mod:`tunelab.lab.frontier`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import safe_load
from tunelab.errors import RunError, first_line
from tunelab.evaluate import fmt, headline
from tunelab.integrity import read_json
from tunelab.lab.frontier import Point, pareto_front, recommend
from tunelab.lab.grid import VARIANTS, comparison_task, read_grid, read_status
from tunelab.rundir import CONFIG, METRICS, MODEL, SUMMARY
from tunelab.runtime import write_json_atomic

COLUMNS = [
    "variant", "state", "strategy", "mode", "extra_tasks", "metric", "score", "kl_to_base",
    "base_answers_reproduced", "original_tasks_score", "trainable", "trainable_pct", "peak_mb", "tokens_per_s",
    "train_time_s", "wall_time_s", "artefact_mb", "error",
]  # fmt: skip


def _score(s: dict, task: str | None = None) -> tuple[str | None, float | None]:
    """The row's metric and score: the headline metric; a run over several tasks is scored on ``task`` (the
    comparison's own data, when the other tasks are extra training) or else on all of them (a multi-task
    run's mean, a continual run's average accuracy)."""
    if s.get("multitask"):
        m = s["multitask"]
        if task is not None:
            return _headline(m["eval"][task])
        return m["metric"], m["mean_score"]
    if s.get("continual"):
        c = s["continual"]
        if task is not None:  # after the whole sequence
            return c["metric"], float(c["matrix"][-1][c["tasks"].index(task)])
        return f"average {c['metric']}", c["average_accuracy"]
    return _headline(s.get("eval") or {})


def _headline(scores: dict) -> tuple[str | None, float | None]:
    h = headline(scores)
    return (h[0], float(h[1])) if h else (None, None)


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


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per variant, in the grid's order, from the run dirs and ``status.json``."""
    grid = read_grid(out)
    names = [v.name for v in grid.variants]
    status, rows = read_status(out), []
    for name in names:
        run_dir = out / VARIANTS / name
        st = status.get(name, {"state": "not run"})
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update(variant=name, state=st.get("state"), error=st.get("error"), curve=loss_curve(run_dir))
        if st.get("state") == "done" or (run_dir / SUMMARY).is_file():
            try:
                row.update(_measured(run_dir, grid.base), state="done")
            except (RunError, ValueError, yaml.YAMLError, KeyError, TypeError, IndexError, AttributeError) as e:
                # a finished variant whose files were lost or damaged since: never shown as done
                row.update(state=BROKEN, error=_damage(run_dir, e))
        rows.append(row)
    return rows


BROKEN = "broken"  #: a row's state when its variant finished but its files are missing or damaged


def _measured(run_dir: Path, base: dict) -> dict[str, Any]:
    """A finished variant's columns, from its summary.json and config.yaml."""
    s = read_json(run_dir / SUMMARY)
    t = _train_stats(s)
    kl, rep, orig = _forgetting(s)
    cfg = safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    task = comparison_task(base, cfg or {})
    metric, score = _score(s, task)
    extra = [x["name"] for x in (cfg or {}).get("tasks") or [] if x["name"] != task] if task else []
    return {
        "strategy": "+".join(s["strategy"]),
        "mode": s["mode"],
        "extra_tasks": ", ".join(extra) or None,
        "score": score,
        "metric": metric,
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


def unfinished(rows: list[dict]) -> dict[str, str]:
    """The variants that did not give a result, each with its state and error: failed, broken, not run."""
    return {
        r["variant"]: f"{r['state']}: {r['error']}" if r["error"] else r["state"]
        for r in rows
        if r["state"] != "done"
    }


def points(rows: list[dict]) -> list[Point]:
    return [
        Point(r["variant"], r["score"], r["kl_to_base"], r["trainable"], r["wall_time_s"])
        for r in rows
        if r["state"] == "done"
    ]


# ----------------------------------------------------------------------------- plots


def _plots(rows: list[dict], front: list[str]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "done" and r["score"] is not None]
    out: dict[str, bytes] = {}

    def scatter(key: str, xlabel: str, title: str, log: float | None = None, mark_front: bool = False):
        """``log``: a symmetric log scale, linear below this value (so that 0 stays on the axis)."""
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        pts = [r for r in done if r[key] is not None]
        for r in pts:
            on = mark_front and r["variant"] in front
            ax.scatter(r[key], r["score"], s=60 if on else 36, c="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(r["variant"], (r[key], r["score"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if mark_front:
            line = sorted((r[key], r["score"]) for r in pts if r["variant"] in front)
            if line:
                ax.plot(*zip(*line, strict=True), c="tab:red", lw=1, ls="--", label="Pareto front", zorder=2)
                ax.legend(fontsize=8)
        if log:
            ax.set_xscale("symlog", linthresh=log)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("task score")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    out["score_vs_forgetting"] = scatter(
        "kl_to_base",
        "forgetting: KL to the base model (log scale; lower is better)",
        "Task score vs forgetting",
        log=0.01,
        mark_front=True,
    )
    out["score_vs_trainable"] = scatter(
        "trainable",
        "trainable parameters (log scale; 0 = trains nothing)",
        "Task score vs trainable parameters",
        log=1,
    )
    out["score_vs_time"] = scatter("wall_time_s", "wall time of the run (s)", "Task score vs wall time")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: a comparison often has 10+ variants
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"], strict=True), label=r["variant"], lw=1.2)
    losses = [v for r in rows for _, v in r["curve"]]
    if losses and min(losses) > 0:  # losses of very different scales (a distillation term beside a task loss)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)" if ax.get_yscale() == "log" else "training loss")
    ax.set_title("Training loss", fontsize=10)
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out["loss_curves"] = buf.getvalue()
    return out


# ----------------------------------------------------------------------------- the files


def recommendation_lines(recs: dict[str, str | None], within: float, front: list[str]) -> list[str]:
    lines = [f"Best task score: **{recs['best_score']}**." if recs["best_score"] else "No variant was scored."]
    for key, what in (
        ("least_forgetting", "least forgetting"),
        ("cheapest", "fewest trainable parameters"),
        ("fastest", "shortest wall time"),
    ):
        if recs[key]:
            lines.append(f"Within {within:g}% of the best score, {what}: **{recs[key]}**.")
    if front:
        lines.append(f"Pareto front (score vs forgetting; no variant beats these on both): {', '.join(front)}.")
    return lines


def write_report(out: Path, *, within: float = 5.0) -> dict[str, Any]:
    """``results.csv``, ``report.md``, ``report.html`` and ``plots/*.png`` in the comparison dir ``out``.
    Returns their paths (``csv``, ``md``, ``html``) and ``unfinished``: the variants that failed, broke
    (their files lost or damaged since) or did not run, each with why (see :func:`unfinished`)."""
    out = Path(out)
    rows = collect(out)
    pts = points(rows)
    front, recs = pareto_front(pts), recommend(pts, within)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plots = _plots(rows, front)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    recs_text = recommendation_lines(recs, within, front)
    shown = [c for c in COLUMNS if c not in ("error",)]
    md = ["# Comparison", "", *[f"- {x}" for x in recs_text], "", "| " + " | ".join(shown) + " |"]
    md.append("|" + "---|" * len(shown))
    md += ["| " + " | ".join(fmt(r[c]) for c in shown) + " |" for r in rows]
    failed = [r for r in rows if r["state"] in ("failed", BROKEN)]
    if failed:
        md += [
            "",
            "Failed or broken variants:",
            *[f"- {r['variant']} ({r['state']}): {r['error']}" for r in failed],
        ]
    md += ["", *[f"![{n}](plots/{n}.png)" for n in plots]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(rows, shown, recs_text, plots))
    problems = unfinished(rows)
    write_json_atomic(
        out / "recommendation.json", {"within": within, "pareto_front": front, **recs, "unfinished": problems}
    )
    return {
        "csv": out / "results.csv",
        "md": out / "report.md",
        "html": out / "report.html",
        "unfinished": problems,
    }


def _html(rows: list[dict], shown: list[str], recs_text: list[str], plots: dict[str, bytes]) -> str:
    def md_bold(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join(
        f'<tr class="{html.escape(r["state"] or "")}">'
        + "".join(f"<td>{html.escape(fmt(r[c]))}</td>" for c in shown)
        + "</tr>"
        for r in rows
    )
    errors = "".join(
        f"<li><b>{html.escape(r['variant'])}</b> ({html.escape(r['state'])}): {html.escape(r['error'] or '')}</li>"
        for r in rows
        if r["state"] in ("failed", BROKEN)
    )
    figures = "".join(
        f'<figure><img id="plot-{n}" alt="{n}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{n.replace('_', ' ')}</figcaption></figure>"
        for n, png in plots.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
tr.failed td, tr.broken td {{ color: #a00; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} img {{ max-width: 640px; border: 1px solid #ddd; }}
</style></head><body>
<h1>tunelab comparison</h1>
<ul id="recommendation">{"".join(f"<li>{md_bold(x)}</li>" for x in recs_text)}</ul>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{f'<h2>Failed or broken variants</h2><ul id="failures">{errors}</ul>' if errors else ""}
<h2>Plots</h2>
{figures}
</body></html>
"""
