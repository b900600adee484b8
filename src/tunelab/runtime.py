"""Where a run executes: device, precision, process rank, memory, and writing JSON atomically."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab import malloc
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
    malloc.release()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the process's peak (ru_maxrss) is all there is
        pass


@contextlib.contextmanager
def objects_frozen() -> Iterator[None]:
    """While the block runs, the objects alive at its start (after a full collection: no garbage among them)
    are left out of Python's cyclic garbage collector (``gc.freeze``); they go back to it at the end. A full
    collection walks every tracked object, and after the imports of torch, transformers and peft a process
    holds about 450,000: 0.23-0.26 s a walk on the bench's CPU. The Trainer makes one as training starts
    (accelerate's ``free_memory``), and the interpreter makes others when it decides to; with the imports'
    objects frozen each walks only the objects the run made (docs/performance.md). Objects that something
    else froze stay as they are: nothing is frozen or thawed then."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


#: glibc's mallopt parameters (malloc.h) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD_DEFAULT, MMAP_MAX_DEFAULT = 128 * 1024, 65536


@contextlib.contextmanager
def reusing_freed_memory(on: bool) -> Iterator[None]:
    """While the block runs (``on``, under glibc), freed memory stays in the process: no block is mapped
    on its own (``M_MMAP_MAX`` 0: large blocks come from the heap, where a later step reuses them) and the
    heap is never trimmed (``M_TRIM_THRESHOLD`` -1). A step's activations and gradients are allocated and
    freed again at every step; mapped, each block's pages are faulted in (and zeroed) anew each time, which
    made steady full fine-tuning steps on long rows 1.36x slower on the bench's CPU (tickets: within noise;
    docs/performance.md). At the end glibc's defaults come back (its mmap threshold stays where it had grown
    to) and the free memory is handed back to the system."""
    libc = malloc.glibc() if on else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT)
        libc.malloc_trim(0)
