"""``training.compile: auto`` decides from measurements, not from a step count: compiling the decoder layers
costs the first compiled step its compile time (on 2 CPU cores ~25-50 s with inductor's disk cache cold, a
few seconds warm) and saves a share of every step after it. Before its first step a run under ``auto`` times
a forward pass over the longest rows of a training batch (:func:`estimate_rows`; no gradients: it adds no
memory the training will not use anyway) and compiles from the first step only when the time it expects to
save is larger than the time it expects compiling to take, cold or warm::

    planned steps x (expected eager step - expected compiled step)  >  expected compile time

Each expected step is the timed forward pass times a ratio learned from earlier runs of the same graph on
this machine (``TUNELAB_HOME/compile.json``, one entry per graph: torch version, device, precision, the
block's module classes and shapes): an eager run records its steps' ratio to the forward pass, a compiled
run its steps' ratio, how long its compile took and whether inductor's cache was warm then. Without a
record: :data:`EAGER_RATIO`, :data:`SAVING` (the compiled step's share saved; also while only the compiled
ratio is recorded), :data:`COLD_S` and :data:`WARM_S`, measured on the default model. The cache counts as
warm when an earlier run of this graph compiled into the same inductor cache directory and that directory
still holds files.

Deciding before the first step, rather than after timing a few eager ones, matters for memory: eager steps
keep more activations, and the resident set keeps its peak (docs/performance.md).

The decision (figures and why) is written to ``RUN/compile.json`` the moment it is made; a resumed run reads
it back, so it compiles as the run it continues did (``--resume`` stays bit-identical). Runs that must be
bit-identical with each other, not only with a resumed self, set ``compile`` to ``on`` or ``off``: the
decision of ``auto`` depends on timings.
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

#: compile time without a record of this graph: cache cold, cache warm (2 CPU cores, default model: 23.6 s
#: cold and 2.5-2.6 s warm on an AVX-512-BF16 EPYC, with margin for slower CPUs, which took up to 85 s cold
#: before the blocks traced one graph once; docs/performance.md); the GPU figures are of the same order
COLD_S = {"cpu": 45.0, "cuda": 60.0}
WARM_S = {"cpu": 4.0, "cuda": 10.0}
#: an eager training step over the timed forward pass, without a record (LoRA on the default model, fp32, 2
#: CPU cores: 5.6 s steps against a 3.4 s estimate of 2 + trained share forward passes)
EAGER_RATIO = 1.6
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
    """``TUNELAB_HOME/compile.json``: per graph key, the compile seconds seen cold and warm, the eager and the
    compiled step over the forward-pass estimate, and the inductor cache directory it compiled into."""

    def __init__(self, home: Path):
        self.path = home / HISTORY
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def expected(self, key: str, device: str, precision: str, estimate: float) -> dict[str, Any]:
        """For this graph now, from a forward-pass ``estimate``: the eager and the compiled step (seconds),
        the compile seconds, and whether inductor's cache is 'warm' or 'cold'."""
        e = self.entries.get(key) or {}
        warm = self.cache(key) == "warm"
        if warm:
            seconds = e.get("warm_s", WARM_S.get(device, WARM_S["cuda"]))
        else:
            seconds = e.get("cold_s", COLD_S.get(device, COLD_S["cuda"]))
        eager = estimate * float(e.get("eager_ratio", EAGER_RATIO))
        saving = SAVING["cuda"] if device == "cuda" else SAVING.get(f"cpu-{precision}", SAVING["cpu-bf16"])
        # a saving from the two ratios only when both were measured: a measured compiled ratio against the
        # default eager one told short rows of the default model (0.53 s eager steps, estimated 0.77) that
        # compiling saves 5 s of 20 steps, and the run compiled for 0.9 s saved; a compiled run never learns
        # the eager ratio that would correct it
        pair = "compiled_ratio" in e and "eager_ratio" in e
        compiled = estimate * e["compiled_ratio"] if pair else eager * (1 - saving)
        return {
            "eager_s": eager,
            "compiled_s": compiled,
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

    def record(self, key: str, **figures: float | str | None) -> None:
        """Keep ``figures`` (``cold_s`` or ``warm_s``, ``eager_ratio``, ``compiled_ratio``) for this graph."""
        e = self.entries.setdefault(key, {})
        e.update({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items() if v is not None})
        if "cold_s" in figures or "warm_s" in figures:
            e["cache_dir"] = str(inductor_cache_dir())
        e["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.entries, indent=1))
        except OSError:  # a read-only home: the next run decides from the defaults
            pass


def pays(steps: int, eager_s: float, compiled_s: float, compile_s: float) -> bool:
    """Whether compiling for ``steps`` steps is expected to finish the training sooner."""
    return steps * (eager_s - compiled_s) > compile_s


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


#: tokens (padded) the forward passes of an estimate cover at least: matmuls over fewer rows run slower
ESTIMATE_TOKENS = 1024


def estimate_rows(rows: list[dict], device: str = "cpu") -> list[dict]:
    """The rows an estimate times: on a CPU the longest ones, as few as give :data:`ESTIMATE_TOKENS` tokens
    padded to the longest (the batch pads each of its rows as far), all of them when they give fewer. There a
    forward pass over k of a batch's n rows takes about k/n of the whole batch's time: on long rows (8 of 530
    tokens) a run's estimate took 1.9 s over 2 rows where it had taken 5.3 s over all 8. On a GPU every row:
    a small model's forward pass there is as long over 2 rows as over 8 (its kernels' launches, not their
    work, take the time), and scaling 2 rows' time by 4 told long rows on an H200 that an eager step takes
    1.18 s where it took 0.26 s; a whole batch's pass costs a GPU little."""
    if device != "cpu":
        return list(rows)
    ranked = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)
    longest = len(ranked[0]["input_ids"]) if ranked else 1
    return ranked[: max(1, -(-ESTIMATE_TOKENS // max(longest, 1)))]


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (a GPU's; a CPU runs its own as they are called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def eager_step_estimate(model: torch.nn.Module, batch: dict, bf16: bool, trained_share: float) -> float:
    """Seconds an eager training step on ``batch`` is expected to take: one forward pass, the faster of two
    timings (the first warms up; a pass slowed by something else running must not decide for the run), times
    2 + the share of weights trained (backward: the gradient with respect to the inputs costs about a
    forward, the one with respect to the weights a forward per trained weight)."""
    from tunelab.evaluate import autocast

    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    was = model.training
    model.eval()  # no dropout: it changes no RNG stream the training draws from
    try:
        seconds = []
        for _ in range(2):
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, bf16):
                try:
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # the head at one position
                except TypeError:  # a model whose forward has no logits_to_keep
                    model(input_ids=ids, attention_mask=mask)
            synchronize(device)  # a GPU's kernels run after their launch returns: the pass ends when they do
            seconds.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return min(seconds) * (2 + trained_share)


class CompileTimer(TrainerCallback):
    """Times the steps of a training with compiled blocks (``compile`` on from the start, or turned on by
    ``auto`` when :func:`pays`) and tells the next run what compiling took. ``start`` compiles the blocks;
    ``estimate`` returns the estimated eager step in seconds (``auto``); ``planned`` is the run's horizon."""

    def __init__(
        self,
        start,
        *,
        auto: bool,
        planned: int,
        key: str,
        precision: str,
        run_dir: Path,
        home: Path,
        estimate=None,
    ):
        self.start, self.auto, self.planned, self.key, self.precision = start, auto, planned, key, precision
        self.run_dir, self.history, self.estimate = run_dir, History(home), estimate
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

    def on_train_begin(self, args, state, control, **kwargs):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.auto and self.decision is None:
            self.decision = self._decide(device)
        if self.auto and not self.decision["compile"]:
            return
        if self.auto:
            self.start()
            self.cache = self.decision.get("cache", "cold")
        else:
            self.cache = self.history.cache(self.key)
        self.compiled_at = state.global_step + 1

    def _decide(self, device: str) -> dict[str, Any]:
        estimate = self.estimate()
        x = self.history.expected(self.key, device, self.precision, estimate)
        on = pays(self.planned, x["eager_s"], x["compiled_s"], x["compile_s"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank as rank 0
            flag = torch.tensor([int(on)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.broadcast(flag, 0)
            on = bool(flag.item())
        saved = self.planned * (x["eager_s"] - x["compiled_s"])
        why = (
            f"{'compiling' if on else 'not compiling'}: {self.planned} steps x ({x['eager_s']:.2f} s eager - "
            f"{x['compiled_s']:.2f} s compiled, expected) = {saved:.0f} s saved against ~{x['compile_s']:.0f} s "
            f"to compile (inductor cache {x['cache']})"
        )
        decision = {"compile": on, "cache": x["cache"], "estimate_s": round(estimate, 3), "why": why}
        try:
            write_text_atomic(self.run_dir / DECISION, json.dumps(decision))
        except OSError:
            pass
        status(f"compile: {why}")
        return decision

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter() - self._t

    # -- what this run teaches the next ---------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        estimate = (self.decision or {}).get("estimate_s")
        first = self.compiled_at or 1
        later = [self.times[s] for s in range(first + 1, state.global_step + 1) if s in self.times]
        if not later:  # one step: nothing steady to learn from
            return
        steady = _median(later)
        if self.compiled_at is None:  # an eager run under auto: its steps over the forward pass
            if estimate:
                self.history.record(self.key, eager_ratio=steady / estimate)
            return
        self.history.record(
            self.key,
            **{f"{self.cache}_s": max(self.times.get(self.compiled_at, steady) - steady, 0.0)},
            compiled_ratio=steady / estimate if estimate else None,
        )

    def summary(self) -> str | None:
        """What ``summary.json`` says of the decision (``levers.why.compile``), for ``auto``."""
        return self.decision["why"] if self.auto and self.decision else None
