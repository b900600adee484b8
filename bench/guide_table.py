"""The table of docs/results.md from a finished ``tunelab compare --preset guide`` directory.

    tunelab compare --preset guide --output-dir bench/out/guide     # < 1 hour on 2 CPU cores
    python bench/guide_table.py bench/out/guide [--plots docs/results]

Prints a Markdown table (one row per variant, the report's figures rounded for reading) and the
recommendation; with ``--plots DIR`` copies the report's plots there.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path


def pct(v: str) -> str:
    return f"{float(v):.0%}" if v else ""


def num(v: str, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v else ""


def count(v: str) -> str:
    if not v:
        return ""
    n = int(v)
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def interval(r: dict, key: str, lo: str, hi: str, fmt) -> str:
    if not r[key]:
        return ""
    return f"{fmt(r[key])} [{fmt(r[lo])}, {fmt(r[hi])}]" if r[lo] and r[hi] else fmt(r[key])


def seeded(out: Path, rows: list[dict]) -> None:
    """A comparison with seeds: each variant's aggregate row (means over its runs, 95% intervals), the
    difference to the best with its paired interval, and what each searched row's search chose."""
    metric = next((r["metric"] for r in rows if r["metric"]), "score")
    print(
        f"| variant | {metric} (mean [95% interval]) | vs best (points) | tied with best | KL to base "
        "| base answers reproduced | trainable | peak MB | tokens/s | train s | wall s | runs |"
    )
    print("|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["row"] != "mean":
            continue
        if not r["score"]:
            print(f"| {r['variant']} | {r['state']}: {r['error']} |" + " |" * 10)
            continue
        best = "best" if r["vs_best"] and float(r["vs_best"]) == 0 and r["tied_with_best"] == "True" else ""
        tied = best or ("tied" if r["tied_with_best"] == "True" else "")
        points = lambda v: f"{float(v) * 100:+.1f}"  # noqa: E731
        print(
            f"| {r['variant']} | {interval(r, 'score', 'score_lo', 'score_hi', pct)} "
            f"| {interval(r, 'vs_best', 'vs_best_lo', 'vs_best_hi', points)} | {tied} "
            f"| {interval(r, 'kl_to_base', 'kl_lo', 'kl_hi', num)} | {pct(r['base_answers_reproduced'])} "
            f"| {count(r['trainable'])} | {float(r['peak_mb']):,.0f} | {num(r['tokens_per_s'], 0)} "
            f"| {num(r['train_time_s'], 0)} | {num(r['wall_time_s'], 0)} | {r['runs']} |"
        )
    print("\n| searched row | chose | compute (of the exhaustive grid's) |")
    print("|---|---|---:|")
    for state in sorted((out / "search").glob("*/state.json")):
        st = json.loads(state.read_text())
        chosen = st["candidates"][st["chosen"]] if st.get("chosen") is not None else "not finished"
        spent, whole = st.get("spent"), st.get("exhaustive")
        cost = f"{spent} of {whole} {st.get('unit', 'steps')} ({spent / whole:.0%})" if spent and whole else ""
        print(f"| {state.parent.name} | {chosen} | {cost} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--plots", help="copy the report's plots into this directory")
    a = ap.parse_args()
    out = Path(a.dir)
    rows = list(csv.DictReader((out / "results.csv").open()))
    runs = [r for r in rows if r.get("row", "run") == "run"]
    if any(r.get("seed") for r in rows):  # a comparison with seeds: its aggregate rows
        seeded(out, rows)
    else:  # one run per variant: its run row (the aggregate row beside it repeats it)
        single(runs)
    total = sum(float(r["wall_time_s"]) for r in runs if r["wall_time_s"])
    print(f"\nsum of the runs' wall times: {total / 60:.1f} min")
    rec = json.loads((out / "recommendation.json").read_text())
    print(json.dumps(rec, indent=1))
    if a.plots:
        dest = Path(a.plots)
        dest.mkdir(parents=True, exist_ok=True)
        for png in sorted((out / "plots").glob("*.png")):
            shutil.copyfile(png, dest / png.name)


def single(rows: list[dict]) -> None:
    """A comparison without seeds: one row per variant."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "score")
    print(
        f"| variant | strategy | {metric} | KL to base | base answers reproduced | trainable (share) "
        "| peak MB | tokens/s | train s | wall s | artefact MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["state"] != "done":
            print(f"| {r['variant']} | {r['state']}: {r['error']} |" + " |" * 9)
            continue
        mode = f" ({r['mode']}, + {r['extra_tasks']})" if r["extra_tasks"] else ""
        pct_ = float(r["trainable_pct"])
        share = (f" ({pct_:.0f}%)" if pct_ >= 10 else f" ({pct_:.2g}%)") if r["trainable"] != "0" else ""
        print(
            f"| {r['variant']} | {r['strategy']}{mode} | {pct(r['score'])} | {num(r['kl_to_base'])} "
            f"| {pct(r['base_answers_reproduced'])} | {count(r['trainable'])}{share} | {float(r['peak_mb']):,.0f} "
            f"| {num(r['tokens_per_s'], 0)} | {num(r['train_time_s'], 0)} | {num(r['wall_time_s'], 0)} "
            f"| {num(r['artefact_mb'], 1)} |"
        )


if __name__ == "__main__":
    main()
