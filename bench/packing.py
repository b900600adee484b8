"""Padding-free packing against padded batches on the CPU (issue 23, point 3).

    python bench/packing.py [--shapes short,tickets] [--attention eager,sdpa] [--method lora|full]

The same rows, sorted by length and cut into batches of ``--batch-size`` (as tunelab's length-grouped
sampler does), are trained two ways, each in its own process so that its peak is its own:

- ``padded``: each batch padded to its longest row, with an attention mask (tunelab's collator);
- ``packed``: each batch's rows concatenated into one sequence with position ids that restart at every row
  and no attention mask, from which transformers builds a block-diagonal causal mask; the first label of
  every row is ignored, so no row predicts the next one's first token.

Both see the same tokens and compute the same loss (the first batch's loss in fp32, before any update, is
printed for both). Everything else is tunelab's CPU defaults: bf16 autocast where the CPU has bf16
instructions (fp32 otherwise), frozen linear weights in bf16, fused AdamW, LoRA r16 on all linear layers.
The modes alternate over ``--repeats`` rounds so that drift in the machine's speed falls on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import OUT, peak_mb, run_child, shape_rows


def encode(shape: str, n: int, tokenizer) -> list[list[int]]:
    rows = shape_rows(shape, n)
    out = []
    for r in rows:
        chat = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        out.append(list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]))
    return sorted(out, key=len)


def padded(rows: list[list[int]], pad: int) -> dict:
    from tunelab.data import Collator

    return Collator(pad)([{"input_ids": r, "labels": r} for r in rows])  # tunelab's own padded batch


def packed(rows: list[list[int]], pad: int) -> dict:
    from tunelab.data import IGNORE

    ids = torch.tensor([t for r in rows for t in r])[None]
    positions = torch.tensor([i for r in rows for i in range(len(r))])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *[len(r) for r in rows[:-1]]]).cumsum(0)
    labels[0, starts] = IGNORE  # a row's first token is not predicted from the row before it
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def child(a) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.levers import cast_frozen_linears
    from tunelab.models import resolve_model
    from tunelab.runtime import bf16_supported

    model_dir = resolve_model(a.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = encode(a.shape, a.batch_size * (a.steps + 1), tokenizer)
    batches = [rows[i : i + a.batch_size] for i in range(0, len(rows), a.batch_size)]
    make = padded if a.mode == "padded" else packed
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=a.attention, dtype=torch.float32)
    # as tunelab trains: no KV cache (transformers builds the block-diagonal mask only without one)
    model.config.use_cache = False
    if a.method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    bf16 = bf16_supported("cpu")
    with torch.no_grad():
        first_loss = model(**make(batches[0], tokenizer.pad_token_id)).loss.item()  # fp32, before any update
    trained = [p for p in model.parameters() if p.requires_grad]
    if bf16 and a.method == "lora":  # tunelab's frozen_weights: bf16
        cast_frozen_linears(model, {id(p) for p in trained})
    opt = torch.optim.AdamW(trained, lr=1e-4 if a.method == "lora" else 1e-5, fused=True)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(make(batches[0], tokenizer.pad_token_id))  # warm-up, not timed
    t0, tokens, positions = time.perf_counter(), 0, 0
    for b in batches[1:]:
        batch = make(b, tokenizer.pad_token_id)
        step(batch)
        tokens += sum(map(len, b))
        positions += batch["input_ids"].numel()
    dt = time.perf_counter() - t0
    result = {
        "tokens_per_s": tokens / dt,
        "step_s": dt / (len(batches) - 1),
        "padding": 1 - tokens / positions,
        "peak_mb": peak_mb(),
        "first_loss_fp32": first_loss,
        "precision": "bf16" if bf16 else "fp32",
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="short,tickets")
    ap.add_argument("--attention", default="eager", help="comma-separated: eager, sdpa")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=8, help="timed steps, after one warm-up step")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--shape")
    ap.add_argument("--mode", choices=["padded", "packed"])
    a = ap.parse_args()
    if a.child:
        return child(a)
    common = ["--method", a.method, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--model", a.model]
    results = {}
    for shape in a.shapes.split(","):
        for attention in a.attention.split(","):
            runs: dict[str, list[dict]] = {"padded": [], "packed": []}
            for _ in range(a.repeats):
                for mode in runs:
                    args = ["--child", "--shape", shape, "--attention", attention, "--mode", mode, *common]
                    runs[mode].append(run_child(__file__, *args))
            for mode, rs in runs.items():
                results[f"{shape} {attention} {mode}"] = {
                    "tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                    "step_s": round(sum(r["step_s"] for r in rs) / len(rs), 3),
                    "padding": round(rs[0]["padding"], 4),
                    "peak_mb": round(max(r["peak_mb"] for r in rs)),
                    "first_loss_fp32": round(rs[0]["first_loss_fp32"], 6),
                    "precision": rs[0]["precision"],
                }
    OUT.mkdir(exist_ok=True)
    (OUT / f"packing-{a.method}.json").write_text(json.dumps(results, indent=2))
    print(f"\n{a.method}, batches of {a.batch_size}, {a.steps} timed steps, {a.repeats} processes per row")
    columns = (("tokens/s (each run)", 22), ("x padded", 10), ("s/step", 8), ("padding", 9), ("peak MB", 9))
    print(" " * 26 + "".join(f"{c:>{w}}" for c, w in columns) + f"{'loss fp32':>11}")
    for label, x in results.items():
        base = results[label.rsplit(" ", 1)[0] + " padded"]
        ratio = sum(x["tokens_per_s"]) / sum(base["tokens_per_s"])
        each = " / ".join(f"{v:.1f}" for v in x["tokens_per_s"])
        print(
            f"{label:26}{each:>22}{ratio:>10.2f}{x['step_s']:>8.2f}{x['padding']:>9.1%}{x['peak_mb']:>9}"
            f"{x['first_loss_fp32']:>11.6f}"
        )


if __name__ == "__main__":
    sys.exit(main())
