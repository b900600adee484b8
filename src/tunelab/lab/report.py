"""The report of a comparison directory: ``results.csv`` (one row per run and one aggregate row per
variant, every figure raw), ``report.md``, a self-contained ``report.html`` (plots embedded as PNG data, no
script, nothing fetched) and ``recommendation.json``, rebuilt from the files alone by ``tunelab report DIR``
(:mod:`tunelab.lab.results` reads them back).

The table a person reads shows each variant's mean with its 95% interval, as percentages and with units,
under plain column names; its difference to the best, and **tied** where that interval reaches 0
(:mod:`tunelab.lab.stats`). The headline never crowns one variant of a tie. Plots: score vs forgetting with
the Pareto front, score vs trainable parameters (log scale), score vs wall time, and every loss curve on one
chart. The picks "within N% of the best" come from :mod:`tunelab.lab.frontier`.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any

from tunelab.lab.frontier import pareto_front, recommend
from tunelab.lab.plots import score_plots, search_plot
from tunelab.lab.results import BROKEN, COLUMNS, RUN, collect, points, unfinished
from tunelab.lab.search import read_searches
from tunelab.lab.stats import NO_INTERVAL, Verdict
from tunelab.metrics import metric_name
from tunelab.modes import MODES
from tunelab.runtime import write_json_atomic

# ----------------------------------------------------------------------------- figures as people read them


def pct(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}%"


def _span(lo: float | None, hi: float | None, show) -> str:
    return f" ({show(lo)} to {show(hi)})" if lo is not None and hi is not None and hi > lo else ""


def _points(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.1f}".replace("-", "\u2212")


def _count(n: float | None) -> str:
    if n is None:
        return ""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def cells(r: dict[str, Any]) -> dict[str, str]:
    """A row's figures as the table shows them, by human column name (with units)."""
    tied = r["tied_with_best"]
    vs = "" if r["vs_best"] is None else _points(r["vs_best"]) + _span(r["vs_best_lo"], r["vs_best_hi"], _points)
    if r.get("best"):
        vs = "best"
    elif tied:
        vs += " tied"
    strategy = (r["strategy"] or "") + (MODES[r["mode"]].row_note(r["extra_tasks"]) if r["mode"] else "")
    kl = r["kl_to_base"]
    trainable = r["trainable"]
    return {
        "Variant": r["variant"],
        "Strategy": strategy,
        "Task score (95% interval)": pct(r["score"]) + _span(r["score_lo"], r["score_hi"], pct),
        "vs best, points (95% interval)": vs,
        "Forgetting: KL to base, nats/token": ""
        if kl is None
        else f"{kl:.3g}" + _span(r["kl_lo"], r["kl_hi"], lambda x: f"{x:.3g}"),
        "Base answers kept": pct(r["base_answers_reproduced"], 0),
        "Trainable parameters": ""
        if trainable is None
        else _count(trainable) + (f" ({r['trainable_pct']:.2g}%)" if trainable else ""),
        "Peak memory": "" if r["peak_mb"] is None else f"{r['peak_mb'] / 1024:.2f} GB",
        "Tokens/s": "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
        "Training time": _seconds(r["train_time_s"]),
        "Runs": str(r["runs"]) if r["row"] != RUN else f"seed {r['seed']}" if r["seed"] is not None else "",
        "State": r["state"] or "",
    }


# ----------------------------------------------------------------------------- searches


def search_tables(searches: dict[str, dict]) -> dict[str, tuple[str, list[dict[str, str]]]]:
    """Per searched variant: a line on what it cost, and a row per candidate (its knobs, its dev score at each
    rung it reached, where it was cut, the chosen one)."""
    out = {}
    for variant, st in searches.items():
        rungs, unit = st.get("rungs", []), st.get("unit", "steps")
        rows = []
        for i, knobs in enumerate(st.get("candidates", [])):
            row = {"Candidate": f"c{i}", **{k: str(v) for k, v in knobs.items()}}
            last = None
            for j, rung in enumerate(rungs):
                s = rung["scores"].get(str(i))
                col = f"dev at {rung['budget']} {unit}"
                row[col] = "" if s is None else "failed" if "error" in s else pct(s["score"])
                last = j if s is not None else last
            chosen = st.get("chosen") == i
            cut = last is not None and last + 1 < len(rungs) and not chosen
            row["Outcome"] = "chosen" if chosen else f"cut after {rungs[last]['budget']} {unit}" if cut else ""
            rows.append(row)
        spent, whole = st.get("spent"), st.get("exhaustive")
        chosen = st.get("chosen")
        ends = st["candidates"][chosen] if chosen is not None and chosen < len(st.get("candidates", [])) else None
        parts = ["it ends with " + ", ".join(f"{k} = {v}" for k, v in ends.items())] if ends else []
        if spent and whole:
            parts.append(
                f"{len(rows)} candidates, successive halving: {spent:,} candidate-{unit} of the exhaustive grid's "
                f"{whole:,} ({spent / whole:.0%})"
            )
        else:
            parts.append(f"{len(rows)} candidates; search not finished")
        if st.get("cooldown"):
            parts.append(f"a cut candidate scored after a cool-down of {st['cooldown']:.0%} of its steps")
        out[variant] = ("; ".join(parts), rows)
    return out


# ----------------------------------------------------------------------------- the files


def recommendation_lines(recs: dict[str, Any], within: float, front: list[str], verdict: Verdict) -> list[str]:
    metric = metric_name(recs.get("metric"))
    tied = verdict.tied
    if not tied:
        lines = ["No variant was scored."]
    elif verdict.how == NO_INTERVAL:
        lines = [
            f"Highest task score ({metric}): {', '.join(f'**{t}**' for t in tied)}; {NO_INTERVAL}, so whether the "
            "others are within noise is unknown (grid `seeds: 3`, or runs that keep their answers, tell)."
        ]
    elif len(tied) > 1:
        names = ", ".join(f"**{t}**" for t in tied)
        lines = [
            f"Tied for the best task score ({metric}): {names}. The 95% interval of each one's difference to "
            f"{tied[0]} reaches 0 ({verdict.how}): the data cannot rank them."
        ]
    else:
        s = verdict.scores[tied[0]]
        behind = "every other variant is below it beyond noise" if len(verdict.scores) > 1 else "the only one"
        lines = [
            f"Best task score ({metric}): **{tied[0]}**, {pct(s.mean)}{_span(s.lo, s.hi, pct)}; {behind} "
            f"({verdict.how})."
        ]
    for key, what in (
        ("least_forgetting", "least forgetting"),
        ("cheapest", "fewest trainable parameters"),
        ("fastest", "shortest wall time"),
    ):
        if recs[key]:
            lines.append(f"Within {within:g}% of the best score, {what}: **{recs[key]}**.")
    if front:
        lines.append(f"Pareto front (score vs forgetting; no variant beats these on both): {', '.join(front)}.")
    if tied and "× 1 seed," in verdict.how:
        lines.append("One seed per variant: the intervals cover the eval rows, not training randomness (grid "
                     "`seeds: 3` covers both).")  # fmt: skip
    return lines


def write_report(out: Path, *, within: float = 5.0) -> dict[str, Any]:
    """``results.csv``, ``report.md``, ``report.html``, ``recommendation.json`` and ``plots/*.png`` in the
    comparison dir ``out``. Returns their paths (``csv``, ``md``, ``html``) and ``unfinished``: the runs that
    failed, broke (their files lost or damaged since) or did not run, each with why."""
    out = Path(out)
    runs, rows, verdict = collect(out)
    pts = points(rows)
    front, recs = pareto_front(pts), recommend(pts, within)
    recs.update(
        metric=next((r["metric"] for r in rows if r["metric"]), None),
        best_score=verdict.tied[0] if len(verdict.tied) == 1 else None,
        tied_for_best=verdict.tied,
        intervals=verdict.how,
        scores={
            v: {**verdict.scores[v].as_dict(), "vs_best": verdict.differences[v].as_dict()} for v in verdict.scores
        },
    )
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for name in dict.fromkeys(r["variant"] for r in rows):
            w.writerows([r for r in runs if r["variant"] == name] + [r for r in rows if r["variant"] == name])
    plots = score_plots(rows, front)
    searches = read_searches(out)
    if (curves := search_plot(searches)) is not None:
        plots["search_dev_curves"] = curves
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    recs_text = recommendation_lines(recs, within, front, verdict)
    table = [cells(r) for r in rows]
    seeded = [cells(r) for r in runs if r["seed"] is not None]
    md = ["# Comparison", "", *[f"- {x}" for x in recs_text], "", *_md_table(table)]
    if seeded:
        md += ["", "## Every run", "", *_md_table(seeded)]
    searched = search_tables(searches)
    for variant, (cost, cands) in searched.items():
        md += ["", f"## Search: {variant}", "", f"{cost}; chosen on the dev split.", "", *_md_table(cands)]
    failed = [r for r in runs if r["state"] in ("failed", BROKEN)]
    if failed:
        md += ["", "Failed or broken runs:", *[f"- {_who(r)} ({r['state']}): {r['error']}" for r in failed]]
    md += ["", *[f"![{n}](plots/{n}.png)" for n in plots]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(table, seeded, failed, recs_text, plots, rows, searched))
    problems = unfinished(runs)
    write_json_atomic(
        out / "recommendation.json", {"within": within, "pareto_front": front, **recs, "unfinished": problems}
    )
    return {
        "csv": out / "results.csv",
        "md": out / "report.md",
        "html": out / "report.html",
        "unfinished": problems,
    }


def _who(r: dict) -> str:
    return r["variant"] + (f" (seed {r['seed']})" if r["seed"] is not None else "")


def _shown(table: list[dict[str, str]]) -> list[str]:
    """The columns with something in them (a comparison without forgetting has no KL column)."""
    return [c for c in table[0] if any(row[c] for row in table)] if table else []


def _md_table(table: list[dict[str, str]]) -> list[str]:
    cols = _shown(table)
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(row[c] for c in cols) + " |" for row in table],
    ]


def _html(table, seeded, failed, recs_text, plots, rows, searched) -> str:
    def md_bold(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    def render(tid: str, tab: list[dict[str, str]], states: list[str]) -> str:
        cols = _shown(tab)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            f'<tr class="{html.escape(st)}">' + "".join(f"<td>{html.escape(row[c])}</td>" for c in cols) + "</tr>"
            for row, st in zip(tab, states, strict=True)
        )
        table = f'<table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return f'<div class="scroll">{table}</div>'

    errors = "".join(
        f"<li><b>{html.escape(_who(r))}</b> ({html.escape(r['state'])}): {html.escape(r['error'] or '')}</li>"
        for r in failed
    )
    figures = "".join(
        f'<figure><img id="plot-{n}" alt="{n}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{n.replace('_', ' ')}</figcaption></figure>"
        for n, png in plots.items()
    )
    search_html = "".join(
        f"<h2>Search: {html.escape(v)}</h2><p>{html.escape(cost)}; chosen on the dev split.</p>"
        + render(f"search-{html.escape(v)}", cands, ["chosen" if c["Outcome"] == "chosen" else "" for c in cands])
        for v, (cost, cands) in searched.items()
    )
    runs_html = ""
    if seeded:
        runs_html = (
            "<details><summary>Every run</summary>"
            + render("runs", seeded, [s["State"] for s in seeded])
            + "</details>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>tunelab comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 100%; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }}
th {{ white-space: normal; min-width: 5em; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
tr.failed td, tr.broken td {{ color: #a00; }} tr.partial td {{ color: #a60; }}
tr.chosen td {{ font-weight: bold; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; max-width: 100%; }}
img {{ max-width: min(640px, 100%); height: auto; border: 1px solid #ddd; }}
</style></head><body>
<h1>tunelab comparison</h1>
<ul id="recommendation">{"".join(f"<li>{md_bold(x)}</li>" for x in recs_text)}</ul>
{render("results", table, [r["state"] or "" for r in rows])}
{runs_html}
{search_html}
{f'<h2>Failed or broken runs</h2><ul id="failures">{errors}</ul>' if errors else ""}
<h2>Plots</h2>
{figures}
</body></html>
"""
