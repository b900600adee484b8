"""Successive halving against the exhaustive grid over the same candidates (docs/search.md).

    python bench/search_vs_exhaustive.py [--steps 18] [--tasks triage extraction] [--strategies lora full ia3]

For each task (the demo's ticket triage, and the date-normalising extraction task of tunelab.builtin_tasks)
and each strategy, six learning rates (log-spaced over the strategy's usual range) are searched on the dev
split (24 rows carved from 320 training rows) by successive halving (η = 3, no cut before step 3: rungs
of 3, 9 and 18 steps) on the default model, with no warmup and a linear decay over the 18 steps. Then every
candidate is continued from its checkpoint to the full budget, which is what the exhaustive grid trains
(a cut candidate continued equals one trained to the end from the start: tests/test_search.py). The script
prints, per task and strategy: halving's choice, the exhaustive grid's best, whether they are the same or
statistically tied on dev (paired bootstrap over the dev rows, tunelab.lab.stats), and the compute each
spent in optimizer steps. Results go to bench/out/search/<task>/ and bench/out/search/summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from tunelab.builtin_tasks import write_tasks
from tunelab.config import load_config
from tunelab.evaluate import read_predictions
from tunelab.lab import stats
from tunelab.lab.compare import _claim, _searched
from tunelab.lab.grid import load_grid
from tunelab.lab.runner import run_in_child
from tunelab.lab.search import STATE
from tunelab.metrics import row_stats

OUT = Path(__file__).resolve().parent / "out" / "search"
RANGES = {"lora": [1e-4, 3e-3], "ia3": [3e-4, 1e-2], "full": [5e-6, 3e-4], "adapters": [1e-4, 3e-3]}
STRATEGIES = {"lora": {"name": "lora", "r": 16, "alpha": 32}, "ia3": "ia3", "full": "full",
              "adapters": {"name": "adapters", "placement": "houlsby"}}  # fmt: skip


def grid_for(task: dict, strategy: str, steps: int, out: Path) -> Path:
    lr = RANGES[strategy]
    grid = {
        "base": {
            "model": "smollm2-135m-instruct",
            "data": {"train": task["train"], "eval": task["eval"], "dev_split": 24},
            "training": {"max_steps": steps, "batch_size": 8, "max_length": 192, "save_steps": 10 * steps},
            "eval": {"max_new_tokens": 32, "batch_size": 24},
        },
        "variants": [{"name": strategy, "strategy": STRATEGIES[strategy], "search": {"lr": {"log_uniform": lr}}}],
        "baseline": False,
        "search": {"eta": 3, "candidates": 6, "min_steps": 3},
        "output_dir": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def dev_rows(run_dir: Path, metric: str):
    head, refs, preds = read_predictions(run_dir / "predictions" / "dev.jsonl")
    return row_stats(metric, preds, refs, head.get("labels"))[None]


def one(task: dict, strategy: str, steps: int) -> dict:
    out = OUT / task["name"] / strategy
    _claim(out)
    grid, configs = load_grid(grid_for(task, strategy, steps, out))
    (v,) = grid.variants
    t0 = time.perf_counter()
    _searched(out, grid, v, configs, {}, None)  # the search only: its finalists are not run here
    halving_s = time.perf_counter() - t0
    home = out / "search" / v.name
    state = json.loads((home / STATE).read_text())
    # the exhaustive grid: every candidate to the full budget, continued from where halving cut it
    t0 = time.perf_counter()
    for i in range(len(state["candidates"])):
        run_dir = home / f"c{i}"
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["train"]["steps"] < steps:
            error = run_in_child(load_config(run_dir / "config.yaml"), True)
            if error:
                raise SystemExit(f"{run_dir}: {error}")
    rest_s = time.perf_counter() - t0
    finals = {}
    for i in range(len(state["candidates"])):
        s = json.loads((home / f"c{i}" / "summary.json").read_text())
        finals[i] = (s["eval"][s["eval"]["primary"]], s["eval"]["loss"], s["eval"]["primary"])
    best = min(finals, key=lambda i: (-finals[i][0], finals[i][1], i))
    metric = finals[best][2]
    verdict = stats.paired_bootstrap({f"c{i}": dev_rows(home / f"c{i}", metric) for i in finals}, metric)
    chosen = state["chosen"]
    return {
        "task": task["name"],
        "strategy": strategy,
        "candidates": [c["lr"] for c in state["candidates"]],
        "halving_lr": state["candidates"][chosen]["lr"],
        "exhaustive_lr": state["candidates"][best]["lr"],
        "same": chosen == best,
        "tied_on_dev": f"c{chosen}" in verdict.tied,
        "dev_at_full_budget": {state["candidates"][i]["lr"]: round(finals[i][0], 4) for i in finals},
        "metric": metric,
        "halving_steps": state["spent"],
        "exhaustive_steps": state["exhaustive"],
        "share": round(state["spent"] / state["exhaustive"], 3),
        "halving_wall_s": round(halving_s, 1),
        "rest_wall_s": round(rest_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--tasks", nargs="+", default=["triage", "extraction"])
    ap.add_argument("--strategies", nargs="+", default=["lora", "full", "ia3"])
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tasks = {t["name"]: t for t in write_tasks(OUT / "data", train_rows=320, eval_rows=40, names=tuple(a.tasks))}
    results = []
    for name in a.tasks:
        for strategy in a.strategies:
            r = one(tasks[name], strategy, a.steps)
            results.append(r)
            print(json.dumps(r), flush=True)
            (OUT / "summary.json").write_text(json.dumps(results, indent=2))
    print("\n| task | strategy | halving chose | exhaustive best | same or tied | compute (steps) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        agree = "same" if r["same"] else "tied on dev" if r["tied_on_dev"] else "**different**"
        print(f"| {r['task']} | {r['strategy']} | {r['halving_lr']:g} | {r['exhaustive_lr']:g} | {agree} | "
              f"{r['halving_steps']} of {r['exhaustive_steps']} ({r['share']:.0%}) |")  # fmt: skip


if __name__ == "__main__":
    main()
