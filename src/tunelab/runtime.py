"""Where a run executes: device, precision, process rank, memory, and writing JSON atomically."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ConfigError
from tunelab.fsutil import write_text_atomic


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


def reset_peak_memory() -> None:
    """Start the peak-memory count afresh, so that a run's peak is its own and not that of an earlier run
    in the same process (``tunelab compare`` runs its variants one after the other): the CUDA allocator's
    peak, and on Linux the resident-set high-water mark (``VmHWM``; writing 5 to ``/proc/self/clear_refs``
    resets it to the current resident set)."""
    gc.collect()  # an earlier run's model, freed and handed back to the system first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the process's peak (ru_maxrss) is all there is
        pass


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb(device: str) -> dict[str, Any]:
    """The peak since the last :func:`reset_peak_memory`: CUDA's max allocated, or on CPU the resident-set
    high-water mark (``VmHWM`` where Linux has it, else ``ru_maxrss``: the whole process's; both KiB)."""
    if device == "cuda":
        return {"peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "kind": "cuda_max_allocated"}
    kib = _vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": round(kib / 1024, 1), "kind": "cpu_peak_rss"}


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
