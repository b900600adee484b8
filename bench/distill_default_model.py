"""A half-depth student distilled from a teacher on the default model, against the same student trained on
labels alone.

    python bench/distill_default_model.py [--teacher-steps 60] [--steps 120] [--retrain]

Runs that finished before (their summary.json exists) are measured again, not retrained, unless --retrain.

Teacher: SmolLM2-135M-Instruct + LoRA (r 16), trained on the demo task (support-ticket triage) as the demo
does. Student: the same model with every other block kept (15 of 30, ``keep_every: 2``), initialised from
the teacher's base weights, trained in full (lr 1e-4, batch 8, ``--steps`` steps); distilled: ``alpha`` 0.5,
forward KL at T 2 from a cached top-64 teacher; labels alone: ``alpha`` 1 (no teacher is loaded).
The teacher is measured twice: as trained (base + LoRA adapter, unmerged) and with the adapter merged
into the weights (what one would serve). Measured for each: parameters, size on disk, generation tokens/s
(greedy, 40 eval prompts in batches of 20, exactly 24 new tokens each, bf16 where the CPU has it; a
separate pass), exact match on the
40 eval tickets and its share of the teacher's, and the token KL(teacher || model) on the eval rows
(teacher-forced, completion tokens).
Prints a Markdown table (recorded in docs/distillation.md) and writes bench/out/distill-<steps>-steps.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from common import OUT


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def measure(model, tok, eval_file: str, teacher, bf16: bool) -> dict:
    from tunelab.config import load_config
    from tunelab.data import Collator, batches, prepare_file
    from tunelab.evaluate import autocast, generate_batch, normalize
    from tunelab.forgetting import token_kl

    data_cfg = load_config({"data": {"train": eval_file}}).data
    prepared = prepare_file(eval_file, tok, data_cfg, 192)
    model.eval()
    prompts, preds = prepared.prompts, []
    for chunk in batches(prompts, 20):
        preds += generate_batch(model, tok, chunk, 24, bf16)
    em = sum(normalize(p) == normalize(r) for p, r in zip(preds, prepared.references, strict=True)) / len(preds)
    # speed: exactly 24 new tokens per prompt, whatever the model answers (an early end of sequence in some
    # rows would otherwise change the count, not the work)
    t0 = time.perf_counter()
    for chunk in batches(prompts, 20):
        generate_batch(model, tok, chunk, 24, bf16, min_new_tokens=24)
    gen_s = time.perf_counter() - t0
    new_tokens = 24 * len(prompts)
    kl_sum, n = 0.0, 0
    collate = Collator(tok.pad_token_id)
    with torch.no_grad(), autocast(torch.device("cpu"), bf16):
        for chunk in batches(prepared.features, 20):
            b = collate(chunk)
            args = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            s, k = token_kl(teacher(**args).logits, model(**args).logits, b["labels"])
            kl_sum, n = kl_sum + float(s), n + k
    return {"exact_match": em, "gen_tokens_per_s": new_tokens / gen_s, "kl_to_teacher": kl_sum / n}


def main() -> None:
    from tunelab.demo import demo_config
    from tunelab.run import load_run, train
    from tunelab.runtime import bf16_supported

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=60)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--retrain", action="store_true")
    a = ap.parse_args()
    out = OUT / "distill"
    teacher_dir = out / "teacher"
    cfg = demo_config(
        teacher_dir, train_rows=320, eval_rows=40, steps=a.teacher_steps, model="smollm2-135m-instruct"
    )
    cfg["eval"]["before"] = False
    if a.retrain or not (teacher_dir / "summary.json").is_file():
        train(cfg, overwrite=True)
    data = cfg["data"]
    bf16 = bf16_supported("cpu")
    teacher = load_run(teacher_dir)
    from tunelab.models import resolve_model

    base_dir = resolve_model("smollm2-135m-instruct")
    results = {
        "teacher": {
            "parameters": sum(p.numel() for p in teacher.model.parameters()),
            "disk_mb": size_mb(base_dir) + size_mb(teacher_dir / "model"),
            **measure(teacher.model, teacher.tokenizer, data["eval"], teacher.model, bf16),
        }
    }
    print("teacher", json.dumps(results["teacher"]), flush=True)
    merged = load_run(teacher_dir).model.merge_and_unload()
    results["teacher, LoRA merged"] = {
        "parameters": sum(p.numel() for p in merged.parameters()),
        "disk_mb": size_mb(base_dir),
        **measure(merged, teacher.tokenizer, data["eval"], teacher.model, bf16),
    }
    del merged
    print("teacher, LoRA merged", json.dumps(results["teacher, LoRA merged"]), flush=True)
    for label, alpha in (("student, distilled", 0.5), ("student, labels alone", 1.0)):
        run_dir = out / f"{label.split(', ')[1].replace(' ', '-')}-{a.steps}-steps"
        student_cfg = {
            "model": "smollm2-135m-instruct",
            "data": data,
            "strategy": [
                "full",
                {"name": "student", "keep_every": 2},
                {"name": "distill", "teacher": str(teacher_dir), "alpha": alpha, "top_k": 64},
            ],
            "training": {
                "max_steps": a.steps,
                "batch_size": 8,
                "lr": 1e-4,
                "warmup_steps": 5,
                "max_length": 192,
                "logging_steps": 5,
                "save_steps": a.steps,
            },
            "eval": {"max_new_tokens": 24, "batch_size": 20},
            "output_dir": str(run_dir),
        }
        if a.retrain or not (run_dir / "summary.json").is_file():
            train(student_cfg, overwrite=True)
        s = json.loads((run_dir / "summary.json").read_text())
        student = load_run(run_dir)
        results[label] = {
            "parameters": s["parameters"]["total"],
            "disk_mb": size_mb(run_dir / "model"),
            "train_time_s": s["train"]["train_time_s"],
            **measure(student.model, student.tokenizer, data["eval"], teacher.model, bf16),
        }
        print(label, json.dumps(results[label]), flush=True)
        del student
        gc.collect()
    OUT.mkdir(exist_ok=True)
    (OUT / f"distill-{a.steps}-steps.json").write_text(json.dumps(results, indent=2))
    t = results["teacher"]
    head = ["model", "parameters", "size on disk", "generation tokens/s", "exact match", "share of teacher"]
    print("\n| " + " | ".join([*head, "KL to teacher"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for label, x in results.items():
        share = x["exact_match"] / t["exact_match"] if t["exact_match"] else float("nan")
        print(
            f"| {label} | {x['parameters'] / 1e6:.1f} M | {x['disk_mb']:.0f} MB | {x['gen_tokens_per_s']:.0f} | "
            f"{x['exact_match']:.0%} | {share:.0%} | {x['kl_to_teacher']:.3f} |"
        )


if __name__ == "__main__":
    main()
