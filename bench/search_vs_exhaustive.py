"""Successive halving against the exhaustive grid over the same candidates (docs/search.md).

    python bench/search_vs_exhaustive.py [--steps 18] [--tasks triage extraction] [--strategies lora full ia3]
                                         [--cooldown 0.33] [--min-steps 3]

For each task (the demo's ticket triage, and the date-normalising extraction task of tunelab.builtin_tasks)
and each strategy, six learning rates (log-spaced over the strategy's usual range) are searched on the dev
split (24 rows carved from 320 training rows) by successive halving (η = 3, no cut before step 3: rungs
of 3, 9 and 18 steps) on the default model, with no warmup and a linear decay over the 18 steps; with
``--cooldown``, a cut candidate is scored after a branch of that share of its steps more, its learning rate
falling to zero (``search.cooldown``, counted in the compute). Compiling is off: every rung restarts
its candidates in new processes, each of which would compile again (at 54 steps `compile: auto` turned
it on, and on an AVX2-only machine the first steps took 45-56 s each instead of ~6). Then every
candidate is continued from its checkpoint to the full budget, which is what the exhaustive grid trains
(a cut candidate continued equals one trained to the end from the start: tests/test_search.py). The script
prints, per task and strategy: halving's choice, the exhaustive grid's best, whether they are the same or
statistically tied on dev (paired bootstrap over the dev rows, tunelab.lab.stats), and the compute each
spent in optimizer steps. Results go to bench/out/search/<task>/ and bench/out/search/summary.json (one
entry per task, strategy and cool-down, kept across invocations).
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
from tunelab.lab.compare import claim, search_variant_runs
from tunelab.lab.grid import load_grid
from tunelab.lab.runner import run_in_child
from tunelab.lab.search import STATE
from tunelab.metrics import row_stats

OUT = Path(__file__).resolve().parent / "out" / "search"
RANGES = {"lora": [1e-4, 3e-3], "ia3": [3e-4, 1e-2], "full": [5e-6, 3e-4], "adapters": [1e-4, 3e-3]}
STRATEGIES = {"lora": {"name": "lora", "r": 16, "alpha": 32}, "ia3": "ia3", "full": "full",
              "adapters": {"name": "adapters", "placement": "houlsby"}}  # fmt: skip


def grid_for(task: dict, strategy: str, steps: int, out: Path, cooldown: float, least: int) -> Path:
    lr = RANGES[strategy]
    grid = {
        "base": {
            "model": "smollm2-135m-instruct",
            "data": {"train": task["train"], "eval": task["eval"], "dev_split": 24},
            "training": {
                "max_steps": steps,
                "batch_size": 8,
                "max_length": 192,
                "save_steps": 10 * steps,
                "compile": "off",
            },
            "eval": {"max_new_tokens": 32, "batch_size": 24},
        },
        "variants": [{"name": strategy, "strategy": STRATEGIES[strategy], "search": {"lr": {"log_uniform": lr}}}],
        "baseline": False,
        "search": {"eta": 3, "candidates": 6, "min_steps": least, "cooldown": cooldown},
        "output_dir": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def dev_rows(run_dir: Path, metric: str):
    head, refs, preds = read_predictions(run_dir / "predictions" / "dev.jsonl")
    return row_stats(metric, preds, refs, head.get("labels"))[None]


def one(task: dict, strategy: str, steps: int, cooldown: float, least: int) -> dict:
    out = OUT / task["name"] / (f"{strategy}-cool{cooldown:g}-min{least}" if cooldown or least != 3 else strategy)
    out = out.with_name(f"{out.name}-r{steps}") if steps != 18 else out  # each budget its own search
    claim(out)
    grid, configs = load_grid(grid_for(task, strategy, steps, out, cooldown, least))
    (v,) = grid.variants
    t0 = time.perf_counter()
    search_variant_runs(out, grid, v, configs)  # the search only: its finalists are not run here
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
        "cooldown": cooldown,
        "plan": state["plan"],
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
    ap.add_argument("--cooldown", type=float, default=0.0)
    ap.add_argument("--min-steps", type=int, default=3)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tasks = {t["name"]: t for t in write_tasks(OUT / "data", train_rows=320, eval_rows=40, names=tuple(a.tasks))}
    path = OUT / "summary.json"
    key = lambda r: (r["task"], r["strategy"], r.get("cooldown", 0.0), str(r.get("plan")))  # noqa: E731
    results = {key(r): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    for name in a.tasks:
        for strategy in a.strategies:
            r = one(tasks[name], strategy, a.steps, a.cooldown, a.min_steps)
            results[key(r)] = r
            print(json.dumps(r), flush=True)
            path.write_text(json.dumps(list(results.values()), indent=2))
    print("\n| task | strategy | rungs | cool-down | halving chose | exhaustive best | same or tied | compute |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        agree = "same" if r["same"] else "tied on dev" if r["tied_on_dev"] else "**different**"
        rungs = ", ".join(str(b) for b, _ in r.get("plan", []))
        print(f"| {r['task']} | {r['strategy']} | {rungs} | {r.get('cooldown', 0.0):g} | {r['halving_lr']:g} | "
              f"{r['exhaustive_lr']:g} | {agree} | {r['halving_steps']} of {r['exhaustive_steps']} "
              f"({r['share']:.0%}) |")  # fmt: skip


if __name__ == "__main__":
    main()
