"""``training.compile: auto`` decides from measurements, not from a step count: compiling the decoder layers
costs the first compiled step its compile time (on 2 CPU cores ~50-85 s with inductor's disk cache cold, a
few seconds warm) and saves a share of every step after it. A run under ``auto`` trains its first
:data:`DECIDE_AFTER` steps eager, times them, and compiles for the rest only when the time it expects to save
is larger than the time it expects compiling to take, cold or warm::

    (planned steps - DECIDE_AFTER) x eager step time x expected saving  >  expected compile time

The expected figures come from earlier runs of the same graph on this machine (``TUNELAB_HOME/compile.json``,
one entry per graph: torch version, device, precision, the block's module classes and shapes): each compiled
run records how long its compile took, whether inductor's cache was warm then, and the share of a step it
saved. With no record: :data:`COLD_S` / :data:`WARM_S` and :data:`SAVING`, measured on the default model.
The cache counts as warm when an earlier run of this graph compiled into the same inductor cache directory
and that directory is still there.

The decision (step, figures, why) is written to ``RUN/compile.json`` the moment it is made; a resumed run
reads it back, so it compiles from the same step as the run it continues (``--resume`` stays bit-identical
from any checkpoint). Runs that must be bit-identical with each other, not only with a resumed self, set
``compile`` to ``on`` or ``off``: the decision of ``auto`` depends on timings.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tunelab.fsutil import write_text_atomic
from tunelab.progress import status

#: eager steps timed before ``auto`` decides (the first is warm-up and not counted)
DECIDE_AFTER = 3
#: compile time without a record of this graph: cache cold, cache warm (2 CPU cores, default model: 45-85 s
#: cold, 5-7 s warm; docs/performance.md); the GPU figures are of the same order (triton, a few graphs)
COLD_S = {"cpu": 60.0, "cuda": 60.0}
WARM_S = {"cpu": 10.0, "cuda": 10.0}
#: share of a step compiling saves, without a record: LoRA on the default model, steady, measured 15% in
#: bf16 on CPUs with AMX and 41% in fp32 on CPUs without (the demo: 5.6 s eager steps, 3.3 s compiled)
SAVING = {"cpu-bf16": 0.15, "cpu-fp32": 0.40, "cuda": 0.15}
DECISION = "compile.json"  #: in the run dir: the decision of this run, read back on resume
HISTORY = "compile.json"  #: in TUNELAB_HOME: what compiling took and saved, per graph


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def graph_key(blocks: list[torch.nn.Module], precision: str) -> str:
    """What decides the compiled graph and so whether inductor's cache holds it: torch's version, the
    device, the precision, and one block's module classes and parameter shapes and dtypes."""
    b = blocks[0]
    p = next(b.parameters())
    parts = [torch.__version__, p.device.type, precision, type(b).__name__]
    parts += sorted({type(m).__name__ for m in b.modules()})
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad}" for n, t in b.named_parameters()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class History:
    """``TUNELAB_HOME/compile.json``: per graph key, the compile seconds seen cold and warm, the saving, the
    inductor cache directory it compiled into."""

    def __init__(self, home: Path):
        self.path = home / HISTORY
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def expected(self, key: str, device: str, precision: str = "fp32") -> tuple[float, float, str]:
        """(compile seconds, share of a step saved, 'warm' or 'cold') for this graph now."""
        e = self.entries.get(key) or {}
        cache = Path(e.get("cache_dir", "")) if e.get("cache_dir") else None
        here = inductor_cache_dir()
        warm = cache is not None and cache == here and here.is_dir() and any(here.iterdir())
        if warm:
            seconds = e.get("warm_s", WARM_S.get(device, WARM_S["cuda"]))
        else:
            seconds = e.get("cold_s", COLD_S.get(device, COLD_S["cuda"]))
        default = SAVING["cuda"] if device == "cuda" else SAVING.get(f"cpu-{precision}", SAVING["cpu-bf16"])
        return float(seconds), float(e.get("saving", default)), "warm" if warm else "cold"

    def record(self, key: str, *, compile_s: float, cache: str, saving: float | None) -> None:
        e = self.entries.setdefault(key, {})
        e[f"{cache}_s"] = round(compile_s, 2)
        if saving is not None:
            e["saving"] = round(min(max(saving, 0.0), 0.9), 3)
        e["cache_dir"] = str(inductor_cache_dir())
        e["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.entries, indent=1))
        except OSError:  # a read-only home: the next run decides from the defaults
            pass


def pays(step_s: float, remaining: int, compile_s: float, saving: float) -> bool:
    """Whether compiling now is expected to finish the training sooner."""
    return remaining * step_s * saving > compile_s


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


class CompileTimer(TrainerCallback):
    """Times the steps of a training with compiled blocks (``compile`` on from the start, or turned on by
    ``auto``) and decides for ``auto``. ``start`` compiles the blocks; ``planned`` is the run's horizon."""

    def __init__(self, start, *, auto: bool, planned: int, key: str, precision: str, run_dir: Path, home: Path):
        self.start, self.auto, self.planned, self.key, self.precision = start, auto, planned, key, precision
        self.run_dir, self.history = run_dir, History(home)
        self.decision: dict[str, Any] | None = None
        self.compiled_at: int | None = None  # the first step that ran compiled (global step numbering)
        self.cache = "cold"
        self.times: dict[int, float] = {}
        self._t = 0.0
        if auto:
            try:
                self.decision = json.loads((run_dir / DECISION).read_text())
            except (OSError, ValueError):
                self.decision = None

    # -- the decision --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not self.auto:  # compiled from the first step
            _, _, self.cache = self.history.expected(self.key, device, self.precision)
            self.compiled_at = state.global_step + 1
        elif (
            self.decision is not None and self.decision["compile"] and state.global_step >= self.decision["after"]
        ):
            self.start()  # resumed past the decision: compiled from here on, as the run it continues was
            self.compiled_at, self.cache = state.global_step + 1, self.decision.get("cache", "cold")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter() - self._t
        if self.auto and self.compiled_at is None and state.global_step == DECIDE_AFTER:
            if self.decision is None:
                self.decision = self._decide(state.global_step)
            if self.decision["compile"]:
                self.start()
                self.compiled_at, self.cache = state.global_step + 1, self.decision["cache"]

    def _decide(self, step: int) -> dict[str, Any]:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        compile_s, saving, cache = self.history.expected(self.key, device, self.precision)
        eager = _median([self.times[s] for s in range(2, step + 1) if s in self.times])
        remaining = max(self.planned - step, 0)
        on = pays(eager, remaining, compile_s, saving)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank as rank 0
            flag = torch.tensor([int(on)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.broadcast(flag, 0)
            on = bool(flag.item())
        verb = "compiling" if on else "not compiling"
        why = (
            f"{verb} after step {step}: {remaining} steps x {eager:.2f} s eager x {saving:.0%} expected saving = "
            f"{remaining * eager * saving:.0f} s against ~{compile_s:.0f} s to compile (inductor cache {cache})"
        )
        decision = {"compile": on, "after": step, "cache": cache, "why": why}
        try:
            write_text_atomic(self.run_dir / DECISION, json.dumps(decision))
        except OSError:
            pass
        status(f"compile: {why}")
        return decision

    # -- what this run teaches the next ---------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        if self.compiled_at is None or self.compiled_at not in self.times:
            return
        compiled = [self.times[s] for s in range(self.compiled_at + 1, state.global_step + 1) if s in self.times]
        if not compiled:
            return
        steady = _median(compiled)
        eager = [self.times[s] for s in range(2, self.compiled_at) if s in self.times]
        saving = 1 - steady / _median(eager) if eager else None
        self.history.record(
            self.key, compile_s=max(self.times[self.compiled_at] - steady, 0.0), cache=self.cache, saving=saving
        )

    def summary(self) -> str | None:
        """What ``summary.json`` says of the decision (``levers.why.compile``), for ``auto``."""
        return self.decision["why"] if self.auto and self.decision else None
