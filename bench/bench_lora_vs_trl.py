"""tunelab LoRA vs TRL's SFTTrainer + PEFT LoRA (its default settings), same model, data, batch size, steps.

Each side runs in its own process, so peak memory (the process's max RSS on CPU, max allocated on CUDA)
is its own. Tokens/s = non-padding tokens the trainer consumed / the trainer's train_runtime, measured
the same way (Trainer's ``num_input_tokens_seen`` with "non_padding") on both sides.

    python bench/bench_lora_vs_trl.py [--steps 20] [--batch-size 8]

Writes bench/out/lora_vs_trl.json and prints a table with the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import report, run_child, table
from common import ticket_rows as rows

R, ALPHA, LR, MAX_LEN = 16, 32, 1e-3, 192


def run_tunelab(model_dir: str, steps: int, bs: int, work: Path) -> dict:
    from tunelab.demo import write_jsonl
    from tunelab.run import train

    data = write_jsonl(rows(steps * bs), work / "train.jsonl")
    cfg = {
        "model": model_dir,
        "data": {"train": str(data)},
        "strategy": {"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {
            "max_steps": steps,
            "batch_size": bs,
            "lr": LR,
            "max_length": MAX_LEN,
            "save_steps": 10 * steps,
            "logging_steps": 5,
        },
        "output_dir": str(work / "tunelab-run"),
    }
    s = train(cfg).summary
    return {
        "tokens": s["train"]["tokens_seen"],
        "train_time_s": s["train"]["train_time_s"],
        "precision": s["precision"],
    }


def run_trl(model_dir: str, steps: int, bs: int, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # conversational prompt/completion, so TRL applies the chat template as tunelab does
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows(steps * bs)
        ]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(  # TRL defaults, except what must match: steps, batch size, lr, max length
        output_dir=str(work / "trl-run"),
        max_steps=steps,
        per_device_train_batch_size=bs,
        learning_rate=LR,
        max_length=MAX_LEN,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )
    peft_cfg = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_cfg)
    out = trainer.train()
    return {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "train_time_s": out.metrics["train_runtime"],
        "precision": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def child(which: str, model_dir: str, steps: int, bs: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        report((run_tunelab if which == "tunelab" else run_trl)(model_dir, steps, bs, Path(d)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--child", choices=["tunelab", "trl"])
    ap.add_argument("--model-dir")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.steps, a.batch_size)
        return
    from tunelab.models import resolve_model

    model_dir = str(resolve_model(a.model))
    results = {}
    for which in ("tunelab", "trl"):
        print(f"running {which} ...", flush=True)
        results[which] = run_child(
            __file__,
            "--child",
            which,
            "--model-dir",
            model_dir,
            "--steps",
            str(a.steps),
            "--batch-size",
            str(a.batch_size),
        )
    t, r = results["tunelab"], results["trl"]
    table(results, "lora_vs_trl")
    print(
        f"ratio tunelab/TRL: tokens/s x{t['tokens_per_s'] / r['tokens_per_s']:.2f}, "
        f"peak memory x{t['peak_mb'] / r['peak_mb']:.2f}  "
        f"(device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"{torch.get_num_threads()} threads, steps {a.steps}, batch {a.batch_size})"
    )


if __name__ == "__main__":
    main()
