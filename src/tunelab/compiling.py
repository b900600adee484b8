"""``training.compile: auto`` decides from measurements, not from a step count: compiling the decoder layers
costs the first compiled step its compile time (on 2 CPU cores ~25-50 s with inductor's disk cache cold, a
few seconds warm) and saves a share of every step after it. A run under ``auto`` trains its first
:data:`EAGER_STEPS` steps eager, takes the fastest of them as its eager step (the first carries the run's
warm-up: the allocator faulting in the working set, oneDNN's first kernels; a step slowed by something else
running must not decide) and compiles from the next step only when the time it expects to save over the
steps left is larger than the time it expects compiling to take, cold or warm::

    steps left x (measured eager step - expected compiled step)  >  expected compile time

The expected compiled step is the measured eager step times the largest ratio of a compiled to an eager step
that the last few runs of the same graph measured on this machine for steps of its size
(``TUNELAB_HOME/compile.json``, one entry per graph: torch version, device, precision, the block's module
classes and shapes), with how long their compile took and whether inductor's cache was warm then. Without a
record: :data:`SAVING` (the compiled step's share saved) and :data:`COLD_S`, measured on the default model;
a warm compile not measured yet for the graph counts as long as its cold one. The cache counts as warm when
an earlier run of this graph compiled into the same inductor cache directory and that directory still holds
files.

Until 2026-12-04 the decision came before the first step, from forward passes timed for it: they cost a run
that stays eager 0.5 s of 11 on short rows and 1.9 s on long ones, and a forward pass times an eager step only
through a learned ratio. The eager steps cost no memory the run does not use anyway: an eager LoRA step on
long rows peaks about where a compiled one does (3,950-3,961 against 3,852-3,874 MB), on short rows lower
(1,485-1,518 against 1,562 MB; docs/performance.md).

The decision (figures, why, the step it compiles from) is written to ``RUN/compile.json`` the moment it is
made; a resumed run reads it back, so it compiles from the same step as the run it continues (``--resume``
stays bit-identical). Runs that must be bit-identical with each other, not only with a resumed self, set
``compile`` to ``on`` or ``off``: the decision of ``auto`` depends on timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tunelab.fsutil import write_text_atomic
from tunelab.progress import status

#: compile time without a record of this graph (2 CPU cores, default model, LoRA: 23.6 s cold on an
#: AVX-512-BF16 EPYC, with margin for slower CPUs, which took up to 85 s cold before the blocks traced one
#: graph once; docs/performance.md); the GPU figure is of the same order
COLD_S = {"cpu": 45.0, "cuda": 60.0}
#: eager steps a run under ``auto`` trains before it decides: with full fine-tuning the first two are warm-up
#: (1.1 and 1.4-1.5 s on short rows, then 0.75-0.98 s; docs/performance.md), with LoRA the first
EAGER_STEPS = 3
#: compiled/eager ratios kept per graph and step size; the decision weighs the least saving among them
RATIOS_KEPT = 3
#: share of an eager step compiling saves, without a record: LoRA on the default model, steady, measured 15%
#: in bf16 on CPUs with AMX and 41% in fp32 on CPUs without (the demo: 5.6 s eager steps, 3.3 s compiled)
SAVING = {"cpu-bf16": 0.15, "cpu-fp32": 0.40, "cuda": 0.15}
#: how :func:`tracing` sets up the trace (a change gives other graphs, which inductor's cache does not hold yet)
TRACE_SETTINGS = "dynamic, no duck sizing, floats constant, first block's input needs a gradient"
DECISION = "compile.json"  #: in the run dir: the decision of this run, read back on resume
HISTORY = "compile.json"  #: in TUNELAB_HOME: what compiling took and saved, per graph


@contextlib.contextmanager
def tracing(model: torch.nn.Module) -> Iterator[None]:
    """The settings tunelab's blocks compile under (:data:`TRACE_SETTINGS` names them in the graph key), for
    the time of training:

    - no "duck" sizing: sizes equal at the first call would share one symbol, and a batch as long as the
      head dimension (64) traced another graph mid-run that missed inductor's disk cache;
    - floats constant (RMSNorm's eps, LoRA's scale, the scale the recomputed attention receives): as symbols
      a pass failed to make them tensors, and dynamo traced every block again, the first trace thrown away
      (3-5 s of a 7 s compile with inductor's cache warm, 2 cores);
    - the input embeddings' output needs a gradient whenever autograd records, as every later block's input
      does: dynamo keys a graph on it, and under LoRA the first block compiled a graph of its own (12.7 s of
      a 38.8 s cold compile, 1 s warm). The price is the first block's input gradient, computed and dropped
      in backward: one more matmul for each of its projections that read the input."""
    import torch.fx.experimental._config as fx_config

    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None

    def needs_grad(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    handle = embeddings.register_forward_hook(needs_grad) if embeddings is not None else None
    try:
        with fx_config.patch(use_duck_shape=False), torch._dynamo.config.patch(specialize_float=True):
            yield
    finally:
        if handle is not None:
            handle.remove()


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def graph_key(blocks: list[torch.nn.Module], precision: str, attention_probs: str = "keep") -> str:
    """What decides the compiled graph and so whether inductor's cache holds it: torch's version, the
    settings tunelab compiles with (:data:`TRACE_SETTINGS`), the device, the precision, whether attention
    recomputes its probabilities, and one block's module classes and parameter shapes and dtypes."""
    b = blocks[0]
    p = next(b.parameters())
    parts = [torch.__version__, TRACE_SETTINGS, p.device.type, precision, type(b).__name__]
    parts += [f"attention_probs:{attention_probs}"] if attention_probs != "keep" else []
    parts += sorted({type(m).__name__ for m in b.modules()})
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad}" for n, t in b.named_parameters()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class History:
    """``TUNELAB_HOME/compile.json``: per graph key, the compile seconds seen cold and warm, the inductor cache
    directory it compiled into, and per :func:`step_size` the compiled step over the eager step measured in
    the same run, for the last :data:`RATIOS_KEPT` runs (``compiled_over_eager``: one graph serves every batch
    length, and compiling saves another share of a step at each). Figures of the forward-pass estimate used
    before 2026-12-04 (``eager_ratio``, ``compiled_ratio``) are other quantities and are not read."""

    def __init__(self, home: Path):
        self.path = home / HISTORY
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def expected(self, key: str, device: str, precision: str, eager_s: float, size: str = "") -> dict[str, Any]:
        """For this graph now, from a measured eager step of ``eager_s`` seconds over steps of ``size``
        (:func:`step_size`): the compiled step expected (seconds), the compile seconds, and whether inductor's
        cache is 'warm' or 'cold'."""
        e = self.entries.get(key) or {}
        warm = self.cache(key) == "warm"
        cold = e.get("cold_s", COLD_S.get(device, COLD_S["cuda"]))
        # a warm compile not measured yet for this graph costs what its cold one did: a full fine-tuning
        # graph whose record held only a cold compile (21 s, long rows) took 13.2 s warm on short rows, where
        # a default of 4 s (LoRA's warm compile is 2.5-3 s) made a 20-step run compile and take 33.9 s
        # against about 20 s eager
        seconds = e.get("warm_s", cold) if warm else cold
        saving = SAVING["cuda"] if device == "cuda" else SAVING.get(f"cpu-{precision}", SAVING["cpu-bf16"])
        seen = _ratios(e, size)
        # the least saving of the last runs: a compiled tickets step took 0.80-0.91 s in one process and
        # 1.00-1.10 s in the next (eager 0.98-1.14 s in both), and compiling must not make a run slower
        ratio = max(seen) if seen else 1 - saving
        return {
            "eager_s": eager_s,
            "compiled_s": eager_s * ratio,
            "compile_s": float(seconds),
            "cache": "warm" if warm else "cold",
        }

    def cache(self, key: str) -> str:
        """'warm' when this graph compiled into the inductor cache directory of now and it still holds files,
        else 'cold'."""
        recorded = (self.entries.get(key) or {}).get("cache_dir")
        here = inductor_cache_dir()
        warm = recorded is not None and Path(recorded) == here and here.is_dir() and any(here.iterdir())
        return "warm" if warm else "cold"

    def record(self, key: str, size: str = "", **figures: float | str | None) -> None:
        """Keep ``figures`` (``cold_s`` or ``warm_s``, ``compiled_over_eager`` for steps of ``size``) for this
        graph."""
        e = self.entries.setdefault(key, {})
        ratio = figures.pop("compiled_over_eager", None)
        if ratio is not None:
            kept = e.get("compiled_over_eager")
            kept = kept if isinstance(kept, dict) else {}
            kept[size] = [*_ratios(e, size), round(ratio, 3)][-RATIOS_KEPT:]
            e["compiled_over_eager"] = kept
        e.update({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items() if v is not None})
        if "cold_s" in figures or "warm_s" in figures:
            e["cache_dir"] = str(inductor_cache_dir())
        e["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.entries, indent=1))
        except OSError:  # a read-only home: the next run decides from the defaults
            pass


def _ratios(entry: dict, size: str) -> list[float]:
    """The compiled/eager ratios an entry holds for steps of ``size``, oldest first."""
    kept = entry.get("compiled_over_eager")
    seen = kept.get(size, []) if isinstance(kept, dict) else []
    return [float(r) for r in (seen if isinstance(seen, list) else [seen]) if isinstance(r, int | float)]


def pays(steps: int, eager_s: float, compiled_s: float, compile_s: float) -> bool:
    """Whether compiling for ``steps`` steps is expected to finish the training sooner."""
    return steps * (eager_s - compiled_s) > compile_s


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def step_size(tokens: int) -> str:
    """The class of a step by the tokens it trained on, a power of two: short rows (8 x 58 tokens) '512',
    the demo's tickets '1024', long rows (8 x 530) '8192'."""
    return str(1 << max(int(tokens) - 1, 0).bit_length())


class CompileTimer(TrainerCallback):
    """Times the steps of a training with compiled blocks (``compile`` on from the start, or turned on by
    ``auto`` when :func:`pays`) and tells the next run what compiling took. ``start`` compiles the blocks
    (from their next call); ``planned`` is the run's horizon."""

    def __init__(self, start, *, auto: bool, planned: int, key: str, precision: str, run_dir: Path, home: Path):
        self.start, self.auto, self.planned, self.key, self.precision = start, auto, planned, key, precision
        self.run_dir, self.history = run_dir, History(home)
        self.decision: dict[str, Any] | None = None
        self.compiled_at: int | None = None  # the first step that ran compiled (global step numbering)
        self.cache = "cold"
        self.times: dict[int, float] = {}
        self.tokens: dict[int, int] = {}  # tokens each step trained on (its size)
        self._t, self._tokens = 0.0, 0
        if auto:
            try:
                self.decision = json.loads((run_dir / DECISION).read_text())
            except (OSError, ValueError):
                self.decision = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.auto:  # compiled from the start
            self.cache = self.history.cache(self.key)
            self.compiled_at = state.global_step + 1
            return
        if self.decision is None and self.planned <= EAGER_STEPS:
            why = (
                f"not compiling: {self.planned} steps, none left after the {EAGER_STEPS} eager ones it would time"
            )
            self.decision = self._record({"compile": False, "why": why})
        self._compile_from(state.global_step + 1)  # resumed past the step the run it continues compiled from

    def _compile_from(self, step: int) -> None:
        """Compile now when the decision compiles from ``step`` or an earlier one (a decision written before
        ``from_step`` existed compiled from the first step)."""
        d = self.decision
        if d and d["compile"] and self.compiled_at is None and step >= d.get("from_step", 1):
            self.start()
            self.cache = d.get("cache", "cold")
            self.compiled_at = step

    def _decide(self, step: int) -> dict[str, Any]:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        left = self.planned - step
        size = step_size(self.tokens[step])
        # the fastest of the eager steps timed: the first carries the warm-up, and one slowed by something
        # else running must not decide for the run (on 2 busy cores a tickets step took 1.02-1.42 s in one run)
        eager = min(self.times.values())
        x = self.history.expected(self.key, device, self.precision, eager, size)
        on = pays(left, x["eager_s"], x["compiled_s"], x["compile_s"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank as rank 0
            flag = torch.tensor([int(on)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.broadcast(flag, 0)
            on = bool(flag.item())
        saved = left * (x["eager_s"] - x["compiled_s"])
        why = (
            f"{f'compiling from step {step + 1}' if on else 'not compiling'}: {left} steps left x "
            f"({x['eager_s']:.2f} s eager, steps to {step} - {x['compiled_s']:.2f} s compiled, expected) = "
            f"{saved:.0f} s saved against ~{x['compile_s']:.0f} s to compile (inductor cache {x['cache']})"
        )
        decision = {"compile": on, "from_step": step + 1, "cache": x["cache"], "eager_s": round(x["eager_s"], 3)}
        return self._record({**decision, "size": size, "why": why})

    def _record(self, decision: dict[str, Any]) -> dict[str, Any]:
        try:
            write_text_atomic(self.run_dir / DECISION, json.dumps(decision))
        except OSError:
            pass
        status(f"compile: {decision['why']}")
        return decision

    def on_step_begin(self, args, state, control, **kwargs):
        self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter() - self._t
        self.tokens[state.global_step] = state.num_input_tokens_seen - self._tokens
        if not self.auto:
            return
        # at the same step in a run and in its resume (a resume from before it weighs the steps it ran)
        if self.decision is None and state.global_step >= EAGER_STEPS:
            self.decision = self._decide(state.global_step)
        self._compile_from(state.global_step + 1)

    # -- what this run teaches the next ---------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        first = self.compiled_at
        later = (
            [self.times[s] for s in range(first + 1, state.global_step + 1) if s in self.times] if first else []
        )
        if not later:  # eager, or one compiled step: nothing to learn from
            return
        steady = _median(later)
        decided = self.decision or {}  # none under compile: on, which has no eager step to weigh against
        eager = decided.get("eager_s")
        self.history.record(
            self.key,
            decided.get("size", ""),
            **{f"{self.cache}_s": max(self.times.get(first, steady) - steady, 0.0)},
            compiled_over_eager=steady / eager if eager else None,
        )

    def summary(self) -> str | None:
        """What ``summary.json`` says of the decision (``levers.why.compile``), for ``auto``."""
        return self.decision["why"] if self.auto and self.decision else None
