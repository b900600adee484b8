"""Task score vs forgetting on the default model: the demo task (support-ticket triage) trained with full
fine-tuning, with LoRA, and with full fine-tuning + each regularizer; every forgetting metric side by side.

    python bench/forgetting_default_model.py [--steps 30] [--out bench/out/forgetting]

Prints a Markdown table (recorded in docs/forgetting.md) and writes bench/out/forgetting.json.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from common import OUT

RUNS = {
    "full": ["full"],
    "lora": [{"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}],
    "full + l2": ["full", {"name": "l2", "weight": 0.1}],
    "full + l2sp": ["full", {"name": "l2sp", "alpha": 0.05}],
    "full + ewc": ["full", {"name": "ewc", "lam": 1000.0, "samples": 32}],
    "full + dropout": ["full", {"name": "dropout", "attention": 0.1, "hidden": 0.1}],
    "full + retention": ["full", {"name": "retention", "lam": 1.0, "batch_size": 4}],
    "full + replay": ["full", {"name": "replay", "share": 0.2}],
}
LR = {"lora": 1e-3}


def main() -> None:
    from tunelab.demo import demo_config
    from tunelab.run import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(OUT / "forgetting"))
    ap.add_argument("--only", nargs="*", help="run only these rows")
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    path = OUT / "forgetting.json"
    if path.is_file():
        results = json.loads(path.read_text())
    for label, strategy in RUNS.items():
        if a.only and label not in a.only:
            continue
        cfg = demo_config(
            out / label.replace(" + ", "-"),
            train_rows=320,
            eval_rows=40,
            steps=a.steps,
            model="smollm2-135m-instruct",
        )
        cfg["strategy"] = strategy
        cfg["training"]["lr"] = LR.get(label, 5e-5)
        cfg["eval"]["before"] = True
        print(f"== {label}", flush=True)
        s = train(cfg, overwrite=True).summary
        f = s["forgetting"]
        results[label] = {
            "exact_match_before": s["eval_before"]["exact_match"],
            "exact_match": s["eval"]["exact_match"],
            "eval_loss": s["eval"]["loss"],
            "kl": f["after"]["kl"],
            "base_answer_ppl_before": f["before"]["base_answer_ppl"],
            "base_answer_ppl": f["after"]["base_answer_ppl"],
            "exact_reproduction": f["after"]["exact_reproduction"],
            "trainable": s["parameters"]["trainable"],
            "train_time_s": s["train"]["train_time_s"],
            "steps": s["train"]["steps"],
        }
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        gc.collect()
    print(
        "\n| strategy | task exact match (before → after) | eval loss | KL to base "
        "| base-answer ppl (before → after) | base answers reproduced | train s |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {r['exact_match_before']:.0%} → {r['exact_match']:.0%} | {r['eval_loss']:.3f} | "
            f"{r['kl']:.3f} | {r['base_answer_ppl_before']:.2f} → {r['base_answer_ppl']:.2f} | "
            f"{r['exact_reproduction']:.0%} | {r['train_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
