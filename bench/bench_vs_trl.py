"""tunelab vs TRL's SFTTrainer (+ PEFT LoRA), side by side in one run: LoRA r16 on all linear layers, and full
fine-tuning; same model, data, batch size, steps, learning rate and sequence lengths.

    python bench/bench_vs_trl.py [--steps 20] [--batch-size 8] [--only lora|full]

Rows: tunelab with its defaults (every ``auto`` lever; ``compile`` stays off in a run this short), tunelab
with ``compile: on`` (what ``auto`` gives runs of 50 steps or more); TRL with its defaults (which include
``bf16=True`` and gradient checkpointing); TRL with ``bf16=True`` and gradient checkpointing off (its
fastest setting here); and TRL at its defaults on tunelab's batch order. Each row runs in its own process,
so its peak resident memory (model loading included) is its own; neither side evaluates or measures
forgetting (the bench times training). Tokens/s = non-padding tokens the trainer consumed / the Trainer's
``train_runtime``, measured the same way on both sides (``num_input_tokens_seen``, "non_padding"). Both
write the checkpoint the Trainer writes at the end of training by default (weights and optimizer state,
inside ``train_runtime``): tunelab's run resumes from it, and TRL's default ``save_strategy`` writes it
too (until 2026-12-03 the bench turned TRL's off, and only tunelab's time held one).

Each row also gives its first step's wall time (with ``compile: on`` tunelab compiles its decoder layers
there: ~20 s the first time on 2 cores, a few seconds once inductor has the kernels in its disk cache; the
start records which; ``compile: auto`` compiles, when it does, at step 4, after three eager steps) and its
steady tokens/s (steps 2..N, without a step that compiled).

TRL's own rows draw batches at random (its default sampler), tunelab groups rows of similar length (its
default): both at their defaults. The last row gives TRL tunelab's batch order, so the two loss curves must
agree: the first step's loss (before any update) to 1e-2, the last within a few percent. Then tunelab's
first-step loss on that batch in fp32, compiled and eager: the value both sides' bf16 approximates, and a
check that compiling changes where bf16 rounds, not the maths.

Model FLOP utilisation (MFU) uses model FLOPs, not the work a side chose to skip: per token, 6·N for full
fine-tuning and 4·N for LoRA (the forward and the gradient with respect to the inputs through the frozen
base; the adapters' own FLOPs are left out), N = the weights of every matmul of the model (all linear
layers and the vocabulary head), divided by the machine's bf16 matmul peak, measured here first (square
matmuls, best of several sizes).

Each side runs under the C allocator its users get: tunelab's rows as the ``tunelab`` command runs (under
tcmalloc or jemalloc where installed: tunelab.malloc), TRL's under the C library's. The row ``trl-malloc``
is TRL's defaults under tunelab's allocator, to tell how much of the memory gap the allocator makes.

Writes bench/out/vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tunelab import malloc

#: the children (--row; every tunelab row's is "tunelab") that run under the allocator the tunelab command preloads
MALLOC_ROWS = ("tunelab", "trl-malloc")
if __name__ == "__main__" and "--child" in sys.argv and sys.argv[sys.argv.index("--row") + 1] in MALLOC_ROWS:
    malloc.preload()  # the child runs again at once, under it, before torch is imported

import torch  # noqa: E402

from common import MAX_LEN, OUT, SHAPES, StepClock, report, run_child, shape_rows  # noqa: E402

R, ALPHA, SEED = 16, 32, 42
LR = {"lora": 1e-3, "full": 5e-5}
LEVERS_OFF = {
    "compile": "off",
    "loss_head": "full",
    "frozen_weights": "fp32",
    "optimizer_impl": "for_loop",
    "attention": "sdpa",
    "allocator": "system",
    "attention_probs": "keep",
    "pad_to": "longest",
    "activations": "keep",
    "lora_kernel": "peft",
}
ROWS = {
    "lora": ["tunelab", "tunelab-compiled", "tunelab-sysalloc", "tunelab-keep-probs", "tunelab-pad-longest",
             "tunelab-recast", "tunelab-keep-activations", "tunelab-peft-lora", "trl-default", "trl-malloc",
             "trl-bf16-no-gc", "trl-same-batches", "trl-fp32", "trl-fp32-same-batches"],
    "full": ["tunelab", "tunelab-compiled", "tunelab-sysalloc", "tunelab-keep-probs", "tunelab-pad-longest",
             "tunelab-recast", "tunelab-keep-activations", "trl-default", "trl-malloc", "trl-bf16-no-gc",
             "trl-same-batches", "trl-fp32", "trl-fp32-same-batches"],
}  # fmt: skip
#: the rows run unless --rows or --all-rows says otherwise: each side's defaults, and the loss check
DEFAULT_ROWS = ("tunelab", "trl-default", "trl-malloc", "trl-same-batches")
#: on a CPU without bf16 instructions (no AVX512-BF16 or AMX) TRL's default bf16 autocast runs at a few
#: tokens/s, so neither a user nor this bench trains with it there: the reference is TRL with bf16=False
#: (its default otherwise: gradient checkpointing on), the precision tunelab's auto picks there too
FP32_ROWS = ("tunelab", "trl-fp32", "trl-fp32-same-batches")
#: the targets of issue 23: tunelab's whole-run tokens/s at least this many times TRL's default, and its
#: whole-process peak at most this share of TRL's
TARGETS = {"lora": (4.0, 0.75), "full": (2.5, 1.0)}
#: rows that are tunelab with options on top of the bench's --tunelab ones
TUNELAB_ROWS = {
    "tunelab": {},
    "tunelab-compiled": {"compile": "on"},
    "tunelab-sysalloc": {"allocator": "system"},  # freed memory handed back to the system each step
    "tunelab-keep-probs": {"attention_probs": "keep"},  # eager attention's probabilities kept for backward
    "tunelab-pad-longest": {"pad_to": "longest"},  # batches padded to their longest row only: shapes vary
    "tunelab-recast": {"weight_casts": "recompute"},  # trained weights cast again in backward, not kept
    "tunelab-keep-activations": {"activations": "keep"},  # activations kept as the forward made them
    "tunelab-peft-lora": {"lora_kernel": "peft"},  # each LoRA layer through PEFT's own forward
}


# -- the children ----------------------------------------------------------------------------------------
def run_tunelab(method: str, shape: str, model_dir: str, steps: int, bs: int, work: Path, extra: dict) -> dict:
    from tunelab.compiling import DECISION
    from tunelab.demo import write_jsonl
    from tunelab.run import train

    data = write_jsonl(shape_rows(shape, steps * bs), work / "train.jsonl")
    strategy = (
        {"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"}
        if method == "lora"
        else "full"
    )
    cfg = {
        "model": model_dir,
        "data": {"train": str(data)},
        "strategy": strategy,
        "training": {
            "max_steps": steps,
            "batch_size": bs,
            "lr": LR[method],
            "max_length": MAX_LEN[shape],
            "save_steps": 10 * steps,
            "logging_steps": 1,
            "seed": SEED,
            **extra,
        },
        "forgetting": {"enabled": False},
        "output_dir": str(work / "run"),
    }
    clock = StepClock()
    result = train(cfg, callbacks=[clock])
    s = result.summary
    losses = [
        json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    decision = result.run_dir / DECISION  # compile: auto's, when it decided: the step it compiled from
    decided = json.loads(decision.read_text()) if decision.is_file() else {}
    return {
        "tokens": s["train"]["tokens_seen"],
        "train_time_s": s["train"]["train_time_s"],
        "precision": s["precision"],
        "gradient_checkpointing": bool(cfg["training"].get("gradient_checkpointing", False)),
        "levers": {k: v for k, v in s["levers"].items() if k != "why"},
        "compile_why": s["levers"]["why"].get("compile"),  # compile: auto's figures, when it decided
        "losses": losses,
        **clock.figures(decided.get("from_step") if decided.get("compile") else None),
    }


def run_trl(
    method: str, variant: str, shape: str, model_dir: str, steps: int, bs: int, work: Path, order: list[int]
) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class Ordered(SFTTrainer):  # tunelab's batch order, so both sides see the same batches
        def _get_train_sampler(self, train_dataset=None):
            return order

    trainer_cls = Ordered if variant.endswith("same-batches") else SFTTrainer

    data = Dataset.from_list(  # conversational prompt/completion: TRL applies the chat template as tunelab does
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in shape_rows(shape, steps * bs)
        ]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = {"bf16": True, "gradient_checkpointing": False} if variant == "trl-bf16-no-gc" else {}
    if variant.startswith("trl-fp32"):
        tuned = {"bf16": False}
    args = SFTConfig(  # TRL defaults, except what must match: steps, batch size, lr, max length, seed
        output_dir=str(work / "trl-run"),
        max_steps=steps,
        per_device_train_batch_size=bs,
        learning_rate=LR[method],
        max_length=MAX_LEN[shape],
        seed=SEED,
        report_to="none",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        **tuned,
    )
    peft_cfg = (
        LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if method == "lora"
        else None
    )
    clock = StepClock()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_cfg, callbacks=[clock]
    )
    out = trainer.train()
    return {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "train_time_s": out.metrics["train_runtime"],
        "precision": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "losses": [x["loss"] for x in trainer.state.log_history if "loss" in x],
        **clock.figures(),
    }


def child(a) -> None:
    with tempfile.TemporaryDirectory() as d:
        if a.row == "tunelab":
            extra = json.loads(a.extra)
            result = run_tunelab(a.method, a.shape, a.model_dir, a.steps, a.batch_size, Path(d), extra)
        else:
            order = json.loads(Path(a.order).read_text())
            result = run_trl(a.method, a.row, a.shape, a.model_dir, a.steps, a.batch_size, Path(d), order)
    result["malloc"] = malloc.in_use()
    report(result)


# -- the parent ------------------------------------------------------------------------------------------
def matmul_peak(seconds: float = 2.0) -> dict[str, float]:
    """Best sustained TFLOP/s of square matmuls in bf16 and fp32 on this device (the MFU denominator)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    best = {}
    for dtype in (torch.bfloat16, torch.float32):
        top = 0.0
        for n in (1024, 2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
            a @ b  # warm-up
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                a @ b
                reps += 1
            if dev == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            top = max(top, 2 * n**3 * reps / took / 1e12)
            if took > seconds:  # a dtype this machine has no instructions for: larger sizes take minutes
                break
        best[str(dtype).removeprefix("torch.")] = round(top, 3)
    return best


def matmul_weights(model_dir: str) -> int:
    """N: the weights of every matmul (each linear layer once per use; a tied head counts as a matmul)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def default_rows() -> tuple[str, ...]:
    from tunelab.runtime import bf16_supported

    cuda = torch.cuda.is_available()
    return DEFAULT_ROWS if bf16_supported("cuda" if cuda else "cpu") else FP32_ROWS


def tunelab_order(model_dir: str, shape: str, steps: int, bs: int) -> list[int]:
    """The batch order tunelab's sampler draws for this data and seed (epoch 0)."""
    from tunelab.config import DataConfig
    from tunelab.data import prepare_file
    from tunelab.demo import write_jsonl
    from tunelab.engine import EpochLengthGroupedSampler
    from tunelab.models import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl(shape_rows(shape, steps * bs), Path(d) / "train.jsonl")
        tok = load_tokenizer(Path(model_dir))
        prepared = prepare_file(path, tok, DataConfig(train=str(path)), MAX_LEN[shape])
    return list(EpochLengthGroupedSampler([f["length"] for f in prepared.features], bs, SEED))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--only", choices=list(ROWS))
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rows", help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument(
        "--all-rows", action="store_true", help="every row: also tunelab compiled, TRL bf16 without gc"
    )
    ap.add_argument(
        "--numerics", action="store_true", help="also the first batch's loss in fp32, compiled and eager"
    )
    ap.add_argument(
        "--tunelab", default="{}", help="extra tunelab training options (JSON), e.g. to turn a lever off"
    )
    ap.add_argument(
        "--levers",
        action="store_true",
        help="instead of the TRL rows: tunelab with each lever at its off value, one at a time (the lever table)",
    )
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--method", choices=list(ROWS))
    ap.add_argument("--shape", choices=SHAPES, default="tickets")
    ap.add_argument("--row")
    ap.add_argument("--model-dir")
    ap.add_argument("--order")
    ap.add_argument("--extra", default="{}")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    from tunelab.models import resolve_model

    model_dir = str(resolve_model(a.model))
    peak = matmul_peak()
    n = matmul_weights(model_dir)
    print(
        f"matmul peak: bf16 {peak['bfloat16']} TFLOP/s, fp32 {peak['float32']} TFLOP/s; N = {n:,} matmul weights"
    )
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    inductor = Path(cache_dir())
    cache = "warm" if inductor.is_dir() and any(p.name != "locks" for p in inductor.iterdir()) else "cold"
    print(f"compiled kernels cache ({inductor}): {cache} at the start")
    results: dict = {
        "peak_tflops": peak,
        "matmul_weights": n,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "inductor_cache": cache,
        "shapes": {},
    }
    wanted = a.rows.split(",") if a.rows else None
    for shape in a.shapes.split(","):
        results["shapes"][shape] = by_method = {}
        with tempfile.TemporaryDirectory() as d:
            order_file = Path(d) / "order.json"
            order_file.write_text(json.dumps(tunelab_order(model_dir, shape, a.steps, a.batch_size)))
            for method in [a.only] if a.only else list(ROWS):
                by_method[method] = {}
                base = json.loads(a.tunelab)
                names = wanted or (ROWS[method] if a.all_rows else default_rows())
                rows_here = [
                    (r, json.dumps({**base, **TUNELAB_ROWS.get(r, {})})) for r in ROWS[method] if r in names
                ]
                if a.levers:
                    rows_here = [("tunelab", a.tunelab)] + [
                        (f"{k}={v}", json.dumps({**json.loads(a.tunelab), k: v})) for k, v in LEVERS_OFF.items()
                    ]
                for row, extra in rows_here:
                    print(f"running {shape} / {method} / {row} ...", flush=True)
                    r = run_child(
                        __file__,
                        *("--child", "--method", method, "--shape", shape),
                        *("--row", "tunelab" if "=" in row or row in TUNELAB_ROWS else row),
                        *("--model-dir", model_dir, "--steps", str(a.steps), "--batch-size", str(a.batch_size)),
                        *("--order", str(order_file), "--extra", extra),
                    )
                    # model FLOPs over the peak of the precision the row computed in, measured on this machine
                    flops = (6 if method == "full" else 4) * n * r["tokens_per_s"]
                    dtype = "bfloat16" if r["precision"] == "bf16" else "float32"
                    r["mfu_pct"] = round(100 * flops / (peak[dtype] * 1e12), 2)
                    r["steady_mfu_pct"] = round(
                        100 * flops / r["tokens_per_s"] * (r["steady_tokens_per_s"] or 0) / (peak[dtype] * 1e12), 2
                    )
                    by_method[method][row] = r
                if a.numerics and not a.levers:
                    by_method[method]["numerics"] = first_losses(method, shape, model_dir, a, order_file)
    OUT.mkdir(exist_ok=True)
    (OUT / ("levers.json" if a.levers else "vs_trl.json")).write_text(json.dumps(results, indent=2))
    print_table(results)


def first_losses(method: str, shape: str, model_dir: str, a, order_file: Path) -> dict[str, float]:
    """tunelab's first-step loss on the same first batch in fp32 (the value both sides' bf16 approximates),
    with compiled and with eager blocks: compiling must not change the maths, only where bf16 rounds."""
    out = {}
    for mode in ("on", "off"):
        print(f"running {shape} / {method} / first-step loss in fp32, compile {mode} ...", flush=True)
        r = run_child(
            __file__,
            *("--child", "--method", method, "--shape", shape, "--row", "tunelab", "--model-dir", model_dir),
            *("--steps", str(a.steps), "--batch-size", str(a.batch_size), "--order", str(order_file)),
            *("--extra", json.dumps({"precision": "fp32", "compile": mode, "max_steps": 2})),
        )
        out[f"fp32_compile_{mode}"] = r["losses"][0]
    return out


def print_table(results: dict) -> None:
    verdicts = []
    for shape, by_method in results["shapes"].items():
        for method in (m for m in ROWS if m in by_method):
            rs = by_method[method]
            ref = next((r for r in ("trl-default", "trl-fp32") if r in rs), "tunelab")
            base = rs[ref]
            print(
                f"\n{shape} rows, {method}: {results['steps']} steps of batch {results['batch_size']}; "
                f"×ref: against {ref}; MFU against this machine's peak in the row's precision"
            )
            head = ("row", "prec", "gc", "malloc", "tokens", "train s", "tok/s", "×ref", "1st s", "steady", "×ref")
            head += ("peak MB", "×ref", "MFU %", "steady", "loss 1", "loss N")
            print(
                "{:16}{:>6}{:>5}{:>9}{:>8}{:>9}{:>8}{:>7}{:>7}{:>8}{:>7}{:>9}{:>7}{:>7}{:>7}{:>9}{:>9}".format(
                    *head
                )
            )
            for row, r in rs.items():
                if row == "numerics":
                    continue
                print(
                    f"{row:16}{r['precision']:>6}{'yes' if r['gradient_checkpointing'] else 'no':>5}"
                    f"{r.get('malloc', '?'):>9}{r['tokens']:>8}{r['train_time_s']:>9.1f}{r['tokens_per_s']:>8.1f}"
                    f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}{r['first_step_s']:>7.1f}"
                    f"{r['steady_tokens_per_s']:>8.1f}"
                    f"{r['steady_tokens_per_s'] / base['steady_tokens_per_s']:>7.2f}"
                    f"{r['peak_mb']:>9.0f}{r['peak_mb'] / base['peak_mb']:>7.2f}{r['mfu_pct']:>7.2f}"
                    f"{r['steady_mfu_pct']:>7.2f}{r['losses'][0]:>9.4f}{r['losses'][-1]:>9.4f}"
                )
            same = next((r for r in ("trl-same-batches", "trl-fp32-same-batches") if r in rs), None)
            if same and "tunelab" in rs:
                a, b = rs["tunelab"]["losses"], rs[same]["losses"]
                print(
                    f"same batches: first-step loss {a[0]:.4f} vs {b[0]:.4f} (|diff| {abs(a[0] - b[0]):.4f}); "
                    f"last {a[-1]:.4f} vs {b[-1]:.4f} ({100 * (a[-1] - b[-1]) / b[-1]:+.1f}%); "
                    f"mean over steps {sum(a) / len(a):.4f} vs {sum(b) / len(b):.4f}"
                )
            if "numerics" in rs:
                x = rs["numerics"]
                print(
                    "first-step loss in fp32: "
                    f"compiled {x['fp32_compile_on']:.6f}, eager {x['fp32_compile_off']:.6f}"
                )
            if ref != "tunelab" and "tunelab" in rs:
                speed = rs["tunelab"]["tokens_per_s"] / rs[ref]["tokens_per_s"]
                memory = rs["tunelab"]["peak_mb"] / rs[ref]["peak_mb"]
                want_speed, want_memory = TARGETS[method]
                verdicts.append(
                    f"{shape:8} {method:5} against {ref}: tokens/s ×{speed:.2f} (target ≥ {want_speed}: "
                    f"{'met' if speed >= want_speed else 'not met'}), peak ×{memory:.2f} (target ≤ {want_memory}: "
                    f"{'met' if memory <= want_memory else 'not met'})"
                )
    if verdicts:
        print("\ntunelab defaults against TRL's, whole runs:\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
