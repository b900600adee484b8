"""Where a run executes: device, precision, process rank, memory, and writing JSON atomically."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ConfigError


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # AVX512-BF16 or AMX make bf16 matmuls several times faster than fp32 on CPU
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError(["training.precision: fp16 needs CUDA; on CPU use bf16 or fp32"])
    return precision


def peak_memory_mb(device: str) -> dict[str, Any]:
    if device == "cuda":
        return {"peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux: the process's resident-set high-water mark.
    return {"peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "kind": "cpu_peak_rss"}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
