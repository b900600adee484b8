"""Does measuring beat guessing? Layer-wise blocks chosen from a measurement (``select: auto``) against the
guesses (top N, bottom N, evenly spaced), LISA and full fine-tuning, on the default model, at the same number
of trainable blocks (LISA: at a time) and the same steps, each trained with several seeds (docs/layerwise.md).

    python bench/layerwise_select.py [--tasks triage,summaries] [--blocks 8] [--steps 16] [--seeds 3]

For each task: its data is generated (tunelab.builtin_tasks), the blocks are measured once on the task's dev
split (``tunelab layers``: grad_norm, fisher, probe; the auto rows read that file), and ``tunelab compare``
trains the grid with ``--seeds`` seeds (means with 95% intervals, ties called by the report). Writes
bench/out/layerwise_select/<task>/ (the comparison dirs, report.md) and prints each report's table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from common import OUT

LR = ["training.lr=1.0e-4"]


def grid(task: dict, scores: Path, n_blocks: int, k: int, steps: int, seeds: int, out: Path) -> dict:
    """The comparison of one task: every layer-wise choice trains ``k`` of ``n_blocks`` blocks."""
    even = [round(i * (n_blocks - 1) / (k - 1)) for i in range(k)] if k > 1 else [n_blocks - 1]
    auto = {"name": "layerwise", "select": "auto", "budget": k, "scores": str(scores)}
    variants = [
        {"name": f"top-{k}", "strategy": {"name": "layerwise", "blocks": [f"{n_blocks - k}-{n_blocks - 1}"]}},
        {"name": f"bottom-{k}", "strategy": {"name": "layerwise", "blocks": [f"0-{k - 1}"]}},
        {"name": f"even-{k}", "strategy": {"name": "layerwise", "blocks": even}},
        {"name": "auto-grad_norm", "strategy": {**auto, "by": "grad_norm"}},
        {"name": "auto-probe", "strategy": {**auto, "by": "probe"}},
        {"name": f"lisa-{k}", "strategy": {"name": "layerwise", "sample": k, "every": max(1, steps // 4)}},
        {"name": "full", "strategy": "full", "set": ["training.lr=5.0e-5"]},
    ]
    for v in variants[:-1]:
        v["set"] = LR
    return {
        "base": {
            "model": "smollm2-135m-instruct",
            "data": {"train": task["train"], "eval": task["eval"]},
            "training": {
                "max_steps": steps,
                "batch_size": 8,
                "warmup_steps": 2,
                "max_length": 192,
                "logging_steps": 4,
                "save_steps": steps,
            },
            "eval": {
                "before": False,
                "max_new_tokens": 32 if task["name"] == "summaries" else 24,
                "batch_size": 20,
            },
        },
        "baseline": False,
        "seeds": seeds,
        "variants": variants,
        "output_dir": str(out),
    }


def paired(out: Path, against: list[str]) -> list[str]:
    """Each row against each of ``against``: the difference of their scores with its 95% interval, from the
    report's own paired bootstrap over eval rows and seeds (the report compares every row with the best)."""
    from tunelab.lab.results import _row_stats, collect
    from tunelab.lab.stats import paired_bootstrap

    runs, _, _ = collect(out)
    done = [r for r in runs if r["state"] == "done"]
    by_variant: dict[str, list[dict]] = {}
    for r in done:
        by_variant.setdefault(r["variant"], []).append(r)
    metric = done[0]["metric"]
    stats = _row_stats(by_variant, metric)
    lines = []
    for b in against:
        for a in by_variant:
            if a == b:
                continue
            v = paired_bootstrap({a: stats[a], b: stats[b]}, metric)
            d = v.differences[a] if v.best == b else v.differences[b]
            sign = 1 if v.best == b else -1  # differences are to the better of the two: a - b either way
            lo, hi = sorted((sign * d.lo, sign * d.hi))
            lines.append(f"{a} - {b}: {100 * sign * d.mean:+.1f} points ({100 * lo:+.1f} to {100 * hi:+.1f})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="triage,summaries")
    ap.add_argument("--blocks", type=int, default=8, help="trainable blocks of every layer-wise row")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=40)
    a = ap.parse_args()

    from tunelab.builtin_tasks import write_tasks
    from tunelab.layers import measure_layers
    from tunelab.run import compare

    root = OUT / "layerwise_select"
    names = tuple(a.tasks.split(","))
    tasks = write_tasks(root / "data", train_rows=320, eval_rows=a.eval_rows, names=names)
    for task in tasks:
        out = root / task["name"]
        measured = out.parent / f"{task['name']}-layers"
        t = time.perf_counter()
        if not (measured / "layers.json").is_file():
            cfg = {"model": "smollm2-135m-instruct", "data": {"train": task["train"]}, "output_dir": str(out)}
            cfg["training"] = {"max_length": 192}
            measure_layers(cfg, out=measured)
        from tunelab.strategies import LayerScores

        scores = LayerScores.load(measured / "layers.json")
        print(f"{task['name']}: measured in {time.perf_counter() - t:.0f} s ({scores.seconds})", flush=True)
        g = grid(task, measured / "layers.json", scores.n_blocks, a.blocks, a.steps, a.seeds, out)
        path = root / f"{task['name']}-grid.yaml"
        path.write_text(yaml.safe_dump(g, sort_keys=False))
        done = compare(path)
        print((done / "report.md").read_text().split("\n\n## ")[0], flush=True)
        print("\n".join(paired(done, [f"top-{a.blocks}", f"even-{a.blocks}"])), flush=True)


if __name__ == "__main__":
    main()
