"""The benchmarks that must run where they are not measured: bench/gpu_check.sh's dry run on the CPU (the
script a GPU machine runs, issue 23), and bench/packing.py's check that packed and padded batches compute the
same loss, on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_every_row_a_cpu_can_and_says_why_it_skips_the_others(tiny_llama):
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--model", str(tiny_llama), "--steps", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = {line.split("  ")[0].strip(): line for line in p.stdout.splitlines() if line[:1].isalpha()}
    for row in ("bf16, sdpa, fused AdamW", "LoRA through PEFT's forward", "full fine-tuning"):
        assert " ok " in lines[row], lines[row]  # ran, the loss fell, the levers resolved as asked
    for row in ("flash_attention_2", "QLoRA 4bit", "compile (triton)"):
        assert "skipped" in lines[row] and "needs CUDA" in lines[row], lines[row]
    assert "skipped" in lines["TRL side by side"] and "checks, 0 failed" in p.stdout


def test_gpu_check_refuses_to_run_for_real_without_cuda(tiny_llama):
    p = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--model", str(tiny_llama)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "no CUDA device here" in p.stderr


def test_packing_bench_trains_the_same_loss_packed_as_padded(tiny_llama):
    """bench/packing.py's packed batches (rows concatenated, position ids restarting at each row, no mask)
    must compute what the padded batches compute, or its timings compare different work: the first batch's
    fp32 loss before any update agrees, and a packed batch has no padding."""
    p = subprocess.run(
        [sys.executable, "bench/packing.py", "--model", str(tiny_llama), "--shapes", "short", "--steps", "1"]
        + ["--repeats", "1", "--attention", "eager,sdpa"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {line[:26].strip(): line[26:].split() for line in p.stdout.splitlines() if line.startswith("short ")}
    assert set(rows) == {f"short {a} {m}" for a in ("eager", "sdpa") for m in ("padded", "packed")}
    for attention in ("eager", "sdpa"):
        padded, packed = rows[f"short {attention} padded"], rows[f"short {attention} packed"]
        assert abs(float(padded[-1]) - float(packed[-1])) < 1e-5 * abs(float(padded[-1])), (padded, packed)
        assert packed[-3] == "0.0%" and float(padded[-3].rstrip("%")) > 0
