"""The GPU paths, each run once and summed up in one table (issue 23, point 6): bench/gpu_check.sh installs
what they need and runs this.

    python bench/gpu_check.py [--model M] [--steps 30] [--dry-run]

Rows, each a short LoRA training (or full fine-tuning) of the model on the demo's tickets in its own process,
so that one failing path does not hide the others and each peak memory is its own:

- ``bf16, sdpa, fused AdamW``: tunelab's CUDA defaults (bf16 autocast, frozen weights in bf16, PyTorch's
  fused attention, AdamW's fused kernel, the LoRA layers as one operation each), checked as resolved in
  ``summary.json``'s levers;
- ``LoRA through PEFT's forward``: the same with ``lora_kernel: peft``, the tokens/s to read the first row's
  against;
- ``flash_attention_2``: the flash-attn package's kernel (skipped, saying so, where it is not installed);
- ``QLoRA 4bit``: base weights in NF4 through bitsandbytes;
- ``compile (triton)``: the decoder layers compiled by inductor (triton kernels on CUDA);
- ``full fine-tuning``: every weight trained, bf16;
- ``TRL side by side``: ``bench/bench_vs_trl.py --only lora`` (tunelab and TRL in one run).

A row passes when the run finishes, its loss is finite and falls, and the levers it asked for are the ones
the run resolved. ``--dry-run`` runs the same rows on the CPU (for a test: a tiny model, few steps): the
CUDA-only rows and the TRL side by side (which ``make bench`` runs on a CPU) are reported as skipped with the
reason, every other row runs. Exit status 1 if a row fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: row name → (strategy, training options, the levers the run must resolve, what it needs beyond CUDA)
ROWS = {
    "bf16, sdpa, fused AdamW": (
        "lora",
        {"precision": "bf16", "attention": "sdpa", "optimizer_impl": "fused"},
        {"attention": "sdpa", "optimizer_impl": "fused", "frozen_weights": "bf16", "lora_kernel": "fused"},
        None,
    ),
    "LoRA through PEFT's forward": (
        "lora",
        {"precision": "bf16", "attention": "sdpa", "lora_kernel": "peft"},
        {"lora_kernel": "peft"},
        None,
    ),
    "flash_attention_2": (
        "lora",
        {"precision": "bf16", "attention": "flash_attention_2"},
        {"attention": "flash_attention_2"},
        "flash_attn",
    ),
    "QLoRA 4bit": (
        "lora",
        {"precision": "bf16", "base_quantization": "4bit"},
        {"base_quantization": "4bit"},
        "bitsandbytes",
    ),
    "compile (triton)": ("lora", {"precision": "bf16", "compile": "on"}, {"compile": "on"}, "triton"),
    "full fine-tuning": ("full", {"precision": "bf16"}, {"optimizer_impl": "fused"}, None),
}
CUDA_ONLY = {"flash_attention_2", "QLoRA 4bit", "compile (triton)"}


def child(a) -> None:
    """One row: a tunelab run; prints its figures as one RESULT line."""
    sys.path.insert(0, str(HERE))
    from common import ticket_rows
    from tunelab.demo import write_jsonl
    from tunelab.run import train

    strategy, training, _, _ = ROWS[a.row]
    training = {**training, **json.loads(a.extra)}
    with tempfile.TemporaryDirectory() as d:
        data = write_jsonl(ticket_rows(a.steps * 8), Path(d) / "train.jsonl")
        lora = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
        cfg = {
            "model": a.model,
            "data": {"train": str(data)},
            "strategy": lora if strategy == "lora" else "full",
            "training": {
                "max_steps": a.steps,
                "batch_size": 8,
                "lr": 1e-3 if strategy == "lora" else 5e-5,
                "max_length": 512,  # the tickets whole with any tokenizer (a tiny one in the dry run)
                "save_steps": 10 * a.steps,
                "logging_steps": 1,
                **training,
            },
            "forgetting": {"enabled": False},
            "output_dir": str(Path(d) / "run"),
        }
        result = train(cfg)
        s = result.summary
        losses = [
            json.loads(x)["loss"]
            for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x
        ]
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens_per_s": s["train"]["tokens_per_s"],
                "peak_mb": s["memory"]["peak_mb"],
                "losses": losses,
                "levers": {k: v for k, v in s["levers"].items() if k != "why"},
                "why": s["levers"].get("why", {}),
                "device": s.get("device"),
            }
        ),
        flush=True,
    )


def run(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """A child's RESULT, or None and the last line it printed (its last lines go to stdout, for the log)."""
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()
        print("\n".join("    | " + x for x in tail[-25:]), flush=True)
        return None, (tail[-1] if tail else f"exit {p.returncode}")[:160]
    return json.loads(lines[-1][len("RESULT ") :]), ""


def _env() -> dict:
    """The children's environment: offline, this checkout's tunelab first on the path (before what the
    machine's PYTHONPATH holds, e.g. the folder gpu_check.sh installed wheels into)."""
    import os

    path = os.pathsep.join(x for x in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def random_weights(model: str, into: Path) -> str:
    """A model of ``model``'s architecture and tokenizer with random weights (seed 0), saved in ``into``: for a
    machine the trained weights cannot reach. Every row's tokens/s and memory are those of the trained model
    (the same shapes and kernels); its losses are not."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(into)
    AutoTokenizer.from_pretrained(model, local_files_only=True).save_pretrained(into)
    return str(into)


def check(row: str, r: dict, want: dict) -> str:
    """Why a finished row fails, or ""."""
    losses = r["losses"]
    if not losses or any(x != x or x in (float("inf"), float("-inf")) for x in losses):
        return "a loss is not finite"
    if losses[-1] >= losses[0]:
        return f"the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})"
    wrong = {k: r["levers"].get(k) for k, v in want.items() if r["levers"].get(k) != v}
    if wrong:
        return "resolved " + ", ".join(f"{k}={v} ({r['why'].get(k, 'no reason given')})" for k, v in wrong.items())
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: every row that can run without CUDA")
    ap.add_argument("--timeout", type=float, default=150, help="seconds a row may take")
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="--model is a folder with a config and tokenizer: train its architecture from random weights",
    )
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--row")
    ap.add_argument("--extra", default="{}")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        sys.exit("gpu_check: no CUDA device here; --dry-run runs the rows that need none")
    where = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    print(f"gpu_check on {where}: torch {torch.__version__}, {a.steps} steps of 8 tickets per row", flush=True)
    with tempfile.TemporaryDirectory() as d:
        if a.random_weights:
            a.model = random_weights(a.model, Path(d) / "model")
            print(f"the model: {a.model}, its architecture with random weights (seed 0)", flush=True)
        failed = rows(a, cuda)
    sys.exit(1 if failed else 0)


def rows(a, cuda: bool) -> int:
    """Runs and prints every row; returns how many failed."""
    table, failed, t_all = [], 0, time.perf_counter()
    for row, (_, _, want, needs) in ROWS.items():
        t0 = time.perf_counter()
        if not cuda and row in CUDA_ONLY:
            table.append((row, "skipped", None, "needs CUDA (dry run)"))
            continue
        if needs and importlib.util.find_spec(needs) is None:
            table.append((row, "skipped", None, f"the {needs} package is not installed"))
            continue
        extra = {} if cuda else {"precision": "fp32", "attention": "sdpa"}  # the CPU's own precision
        want = {k: v for k, v in want.items() if cuda or k not in ("frozen_weights",)}
        r, err = run(
            [
                __file__,
                "--child",
                "--row",
                row,
                "--model",
                a.model,
                "--steps",
                str(a.steps),
                "--extra",
                json.dumps(extra),
            ],
            a.timeout,
        )
        why = err or check(row, r, want)
        failed += bool(why)
        table.append((row, "FAILED" if why else "ok", r, why or f"{time.perf_counter() - t0:.0f} s"))
        print(f"{row}: {table[-1][1]}, {table[-1][3]}" + (f" {json.dumps(r)}" if r else ""), flush=True)
    # TRL side by side: the bench's own table, printed as it is
    if not cuda:  # make bench runs it on a CPU; here it would time TRL's bf16 on a tiny model
        table.append(("TRL side by side", "skipped", None, "dry run: make bench runs it on the CPU"))
    elif importlib.util.find_spec("trl") is None:
        table.append(("TRL side by side", "skipped", None, "trl is not installed (pip install -e '.[bench]')"))
    else:
        t0 = time.perf_counter()
        bench = [str(HERE / "bench_vs_trl.py"), "--only", "lora", "--steps", str(min(a.steps, 20))]
        bench += ["--model", a.model, "--rows", "tunelab,trl-default,trl-same-batches"]
        p = subprocess.Popen(
            [sys.executable, *bench], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        said = []
        for line in p.stdout:  # as it comes: a run cut short still shows the shapes it finished
            print("    " + line, end="", flush=True)
            said.append(line)
        ok = p.wait() == 0
        failed += not ok
        msg = f"{time.perf_counter() - t0:.0f} s, table above" if ok else (said or ["?"])[-1].strip()[:160]
        table.append(("TRL side by side", "ok" if ok else "FAILED", None, msg))
    print(f"\n{'check':26}{'result':>9}{'tokens/s':>10}{'peak MB':>9}{'loss first -> last':>22}  note")
    for row, result, r, note in table:
        figures = (
            f"{r['tokens_per_s']:>10.0f}{r['peak_mb']:>9.0f}{r['losses'][0]:>12.4f} -> {r['losses'][-1]:<6.4f}"
            if r
            else f"{'':>10}{'':>9}{'':>22}"
        )
        print(f"{row:26}{result:>9}{figures}  {note}")
    print(f"\n{len(table)} checks, {failed} failed, {time.perf_counter() - t_all:.0f} s")
    return failed


if __name__ == "__main__":
    main()
