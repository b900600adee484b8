"""The benchmarks that must run where they are not measured: bench/gpu_check.sh's dry run on the CPU (the
script a GPU machine runs, issue 23) and the bundle bench/gpu_bundle.py makes for it, and bench/packing.py's
check that packed and padded batches compute the same loss, on a tiny model; and how the side by side
counts its steady rate."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_every_row_a_cpu_can_and_says_why_it_skips_the_others(tiny_llama, tmp_path):
    """From a folder that holds the model's config and tokenizer and no weights (what bench/gpu_bundle.py
    copies to a machine the weights cannot reach), as --random-weights trains it."""
    weightless = tmp_path / "model"
    shutil.copytree(tiny_llama, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(
        [
            "bash",
            "bench/gpu_check.sh",
            "--dry-run",
            "--model",
            str(weightless),
            "--random-weights",
            "--steps",
            "4",
        ],
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
    assert "its architecture with random weights" in p.stdout


def test_gpu_bundle_keeps_only_the_bitsandbytes_library_for_the_machines_cuda(tmp_path, monkeypatch):
    """A bitsandbytes wheel trimmed to one CUDA release holds that release's library and the CPU one, nothing
    else it had; its RECORD lists exactly the files it holds (pip uninstalls by it); it installs."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from gpu_bundle import trim_bitsandbytes

    libs = ["cpu", "cuda126", "cuda130", "cuda132", "rocm70", "xpu2026"]
    info = "bitsandbytes-9.9.dist-info"
    files = {"bitsandbytes/__init__.py": "X = 1\n"} | {f"bitsandbytes/libbitsandbytes_{x}.so": x for x in libs}
    files[f"{info}/METADATA"] = "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 9.9\n"
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/RECORD"] = "".join(f"{n},sha256={_digest(c)},{len(c)}\n" for n, c in files.items())
    files[f"{info}/RECORD"] += f"{info}/RECORD,,\n"
    wheel = tmp_path / "bitsandbytes-9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    trim_bitsandbytes(wheel, "130")
    kept = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")}
    assert kept == {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"}
    with zipfile.ZipFile(wheel) as z:
        listed = {x.split(",")[0] for x in z.read("bitsandbytes-9.9.dist-info/RECORD").decode().splitlines()}
        assert listed == set(z.namelist())
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    assert sorted(p.name for p in (site / "bitsandbytes").glob("*.so")) == [
        "libbitsandbytes_cpu.so",
        "libbitsandbytes_cuda130.so",
    ]
    with pytest.raises(SystemExit, match="no library for CUDA 118"):
        trim_bitsandbytes(wheel, "118")


def _digest(content: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()


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


def test_the_steady_rate_leaves_out_the_step_that_compiled(monkeypatch):
    """bench/common.py's StepClock: steps 2..N, without the step where compile: auto turned compiling on."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import StepClock

    clock = StepClock()
    clock.t0, clock.marks = 0.0, [(1.0, 100), (2.0, 200), (5.0, 300), (6.0, 400)]  # step 3 took 3 s: it compiled
    assert clock.figures() == {"first_step_s": 1.0, "steady_tokens_per_s": 60.0}
    assert clock.figures(compiled_at=3) == {"first_step_s": 1.0, "steady_tokens_per_s": 100.0}
    assert clock.figures(compiled_at=1) == clock.figures()  # compiled in the first step: not in steps 2..N
