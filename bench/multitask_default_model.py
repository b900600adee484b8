"""Multi-task vs single-task on the default model: the three built-in generated tasks (tunelab.builtin_tasks:
triage, sentiment, extraction) trained each alone, and jointly (one shared LoRA; and one LoRA per task).

    python bench/multitask_default_model.py [--steps 40] [--only alone:triage joint-shared ...]

Every run: LoRA r 16 / alpha 32 on all linear layers, learning rate 1e-3, batch 8, 320 training and 40 eval
rows per task, answers of up to 40 generated tokens. Alone: ``--steps`` steps on one task. Joint:
3 x ``--steps`` steps, uniform sampling, so each task gets about as many batches as alone and the total
compute equals the three alone runs together.
Prints a Markdown table (recorded in docs/multitask.md) and writes bench/out/multitask.json.
"""

from __future__ import annotations

import argparse
import gc
import json

from common import OUT

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
TRAINING = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 5, "max_length": 192, "logging_steps": 5}


def main() -> None:
    from tunelab.builtin_tasks import write_tasks
    from tunelab.evaluate import headline
    from tunelab.run import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    out = OUT / "multitask"
    tasks = write_tasks(out / "data", train_rows=320, eval_rows=40)
    names = [t["name"] for t in tasks]
    runs: dict[str, dict] = {}
    for t in tasks:
        data = {"train": t["train"], "eval": t["eval"]}
        runs[f"alone:{t['name']}"] = {"data": data, "strategy": LORA, "steps": a.steps}
    runs["joint-shared"] = {"mode": "multitask", "tasks": tasks, "strategy": LORA, "steps": 3 * a.steps}
    runs["joint-per-task"] = {
        "mode": "multitask",
        "tasks": tasks,
        "strategy": {**LORA, "per_task": True},
        "steps": 3 * a.steps,
    }
    path = OUT / "multitask.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for label, r in runs.items():
        if a.only and label not in a.only:
            continue
        cfg = {k: v for k, v in r.items() if k != "steps"}
        cfg.update(
            training={**TRAINING, "max_steps": r["steps"], "save_steps": r["steps"]},
            eval={"before": label == "joint-shared", "max_new_tokens": 40, "batch_size": 20},
            output_dir=str(out / label.replace(":", "-")),
        )
        if "mode" in cfg:
            cfg["multitask"] = {"sampling": "uniform"}
        s = train(cfg, overwrite=True).summary
        if "multitask" in s:
            scores = {n: headline(s["multitask"]["eval"][n])[1] for n in names}
            before = s["multitask"]["eval_before"]
            base = {n: headline(before[n])[1] for n in names} if before else None
        else:
            scores, base = {label.split(":")[1]: headline(s["eval"])[1]}, None
        results[label] = {
            "scores": scores,
            "base": base,
            "steps": s["train"]["steps"],
            "tokens_per_s": s["train"]["tokens_per_s"],
            "train_time_s": s["train"]["train_time_s"],
            "wall_time_s": s["wall_time_s"],
            "trainable": s["parameters"]["trainable"],
            "kl_to_base": (s.get("forgetting") or {}).get("after", {}).get("kl"),
            "forgetting_per_task": {
                n: f["after"]["kl"] for n, f in ((s.get("forgetting") or {}).get("per_task") or {}).items()
            },
        }
        print(label, json.dumps(results[label]), flush=True)
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        gc.collect()
    print(f"\n| run | {' | '.join(names)} | steps | train s | trainable | KL to base |")
    print(f"|---|{'---|' * len(names)}---|---|---|---|")
    for label, x in results.items():
        cells = [f"{x['scores'][n]:.0%}" if n in x["scores"] else "" for n in names]
        kl = x["kl_to_base"] if x["kl_to_base"] is not None else x["forgetting_per_task"]
        row = [label, *cells, x["steps"], f"{x['train_time_s']:.0f}", f"{x['trainable']:,}", kl]
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
