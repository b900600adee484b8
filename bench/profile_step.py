"""Where a training step's time goes: torch.profiler over a few steps of tunelab on the default model,
self time per operator summed into categories (matmuls, attention, softmax and loss, element-wise,
casting, optimizer, data).

    python bench/profile_step.py --strategy lora [--set loss_head=full --set frozen_weights=fp32]
    python bench/profile_step.py --strategy full [--shape tickets|short|long]

Warm-up steps run first (not profiled); then ``--steps`` steps are profiled. The process runs under the C
allocator the ``tunelab`` command preloads (tcmalloc where installed): under glibc's, the element-wise
operators of the same LoRA step took 2-5x as long (softmax 0.10 s a step against 0.02-0.03, 2026-12-04), which
is not where the command's time goes. Prints the table and the top
operators; writes bench/out/profile-<strategy>[-<settings>].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tunelab import malloc

if __name__ == "__main__":
    malloc.preload()  # as the tunelab command runs: tcmalloc or jemalloc where installed (TUNELAB_MALLOC)

import torch  # noqa: E402

from common import MAX_LEN, OUT, SHAPES, shape_rows  # noqa: E402

CATEGORIES = [  # first match wins, on the operator's name
    ("optimizer", ("adam", "_foreach_", "_fused_")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    (
        "matmul",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "mkldnn"),
    ),
    ("softmax + loss", ("softmax", "nll_loss", "cross_entropy")),
    ("casting", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone")),
    ("data", ("DataLoader", "collate")),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "element-wise and other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["lora", "full"], default="lora")
    ap.add_argument("--shape", choices=SHAPES, default="tickets")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="training.KEY=VALUE, e.g. loss_head=full")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from tunelab.demo import write_jsonl
    from tunelab.run import train

    total = a.warmup + a.steps

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof = profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            )

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == a.warmup:
                self.prof.start()
                self.t0 = time.perf_counter()
            elif state.global_step == total:
                self.prof.stop()
                self.wall = (time.perf_counter() - self.t0) / a.steps

    extra = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        extra[k] = v
    strategy = (
        {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
        if a.strategy == "lora"
        else "full"
    )
    cb = Profile()
    with tempfile.TemporaryDirectory() as d:
        data = write_jsonl(shape_rows(a.shape, total * a.batch_size), Path(d) / "train.jsonl")
        cfg = {
            "model": a.model,
            "data": {"train": str(data)},
            "strategy": strategy,
            "training": {
                "max_steps": total,
                "batch_size": a.batch_size,
                "lr": 1e-3 if a.strategy == "lora" else 5e-5,
                "max_length": MAX_LEN[a.shape],
                "save_steps": 10 * total,
                "logging_steps": 1,
                **extra,
            },
            "forgetting": {"enabled": False},
            "output_dir": str(Path(d) / "run"),
        }
        s = train(cfg, callbacks=[cb]).summary
    events = cb.prof.key_averages()
    by_cat: dict[str, float] = {}
    ops, calls = [], 0
    for e in events:
        self_us = e.self_cpu_time_total
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + self_us
        ops.append((self_us, e.key))
        calls += e.count if e.key.startswith("aten::") else 0
    step_s = sum(by_cat.values()) / 1e6 / a.steps
    label = "-".join([a.strategy, a.shape, *(kv.replace("=", "_") for kv in a.set)])
    print(
        f"\n{label}: {step_s:.2f} s per step (self CPU time, {a.steps} profiled steps), {cb.wall:.2f} s wall "
        f"(profiler on), {calls / a.steps:,.0f} aten operator calls per step; levers {s['levers']}"
    )
    print(f"{'category':28}{'s/step':>8}{'share':>8}")
    for cat, us in sorted(by_cat.items(), key=lambda x: -x[1]):
        print(f"{cat:28}{us / 1e6 / a.steps:>8.3f}{us / sum(by_cat.values()):>8.1%}")
    print("\ntop operators (self CPU time)")
    for us, name in sorted(ops, reverse=True)[:15]:
        print(f"  {name:60}{us / 1e6 / a.steps:>8.3f} s/step")
    OUT.mkdir(exist_ok=True)
    (OUT / f"profile-{label}.json").write_text(
        json.dumps(
            {
                "step_s": step_s,
                "wall_step_s": cb.wall,
                "aten_calls_per_step": calls / a.steps,
                "categories_s": {k: v / 1e6 / a.steps for k, v in by_cat.items()},
                "top": [(n, us / 1e6 / a.steps) for us, n in sorted(ops, reverse=True)[:30]],
                "levers": s["levers"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
