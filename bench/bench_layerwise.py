"""Layer-wise "top 4 of 30 blocks" vs full fine-tuning on the default model: the tokens/s that frozen lower
blocks save (no backward compute below the lowest trainable block), same data, batch size and steps.

    python bench/bench_layerwise.py [--steps 10] [--batch-size 8]

Writes bench/out/layerwise_vs_full.json and prints a table with the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import report, run_child, table, ticket_config, ticket_rows

VARIANTS = {
    "full": "full",
    "layerwise-top4": {"name": "layerwise", "top": 4},
}


def child(variant: str, model_dir: str, steps: int, bs: int) -> None:
    from tunelab.demo import write_jsonl
    from tunelab.run import train

    with tempfile.TemporaryDirectory() as d:
        data = write_jsonl(ticket_rows(steps * bs), Path(d) / "train.jsonl")
        cfg = ticket_config(model_dir, data, VARIANTS[variant], Path(d) / "run", steps, bs)
        s = train(cfg).summary
    report(
        {
            "tokens": s["train"]["tokens_seen"],
            "train_time_s": s["train"]["train_time_s"],
            "trainable": s["parameters"]["trainable"],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--child", choices=list(VARIANTS))
    ap.add_argument("--model-dir")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.steps, a.batch_size)
        return
    from tunelab.models import resolve_model

    model_dir = str(resolve_model(a.model))
    results = {}
    for v in VARIANTS:
        print(f"running {v} ...", flush=True)
        results[v] = run_child(
            __file__,
            "--child",
            v,
            "--model-dir",
            model_dir,
            "--steps",
            str(a.steps),
            "--batch-size",
            str(a.batch_size),
        )
    table(results, "layerwise_vs_full")
    f, lw = results["full"], results["layerwise-top4"]
    print(
        f"layerwise top 4 / full: tokens/s x{lw['tokens_per_s'] / f['tokens_per_s']:.2f}, "
        f"peak memory x{lw['peak_mb'] / f['peak_mb']:.2f}, trainable {lw['trainable']:,} vs {f['trainable']:,}"
    )


if __name__ == "__main__":
    main()
