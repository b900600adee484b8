"""Speed and memory levers (``training.loss_head``, ``frozen_weights``, ``optimizer_impl``, ``compile``,
``allocator``, ``attention_probs``, ``pad_to``, ``weight_casts``, ``activations``, ``lora_kernel``,
``threads``), each resolved once per run from its setting, the device, the precision, the model and what the
strategies need. ``auto`` picks what measured fastest at no cost in correctness (docs/performance.md); the
resolved values are written to ``summary.json`` under ``levers``, with why an ``auto`` lever stayed off.

- ``loss_head``: ``positions`` applies the vocabulary head and the loss to the positions that carry loss
  only (tunelab.losshead); ``full`` is transformers' own path. ``auto``: positions, unless a strategy reads
  the training batch's logits or the model changes its logits after the head.
- ``frozen_weights``: ``bf16`` holds the frozen weights of linear layers in bf16, so autocast no longer
  casts them from fp32 at every step (the matmuls see the same bf16 values: the arithmetic is unchanged)
  and half their memory is freed; trained weights and the optimizer state stay fp32. ``auto``: bf16 under
  bf16 mixed precision when no strategy changes base weights (with full or layer-wise fine-tuning the
  saved model carries the frozen weights, which must keep their own precision).
- ``optimizer_impl``: AdamW's ``fused`` kernel (one pass per tensor), ``foreach`` (torch's default) or
  ``for_loop``. ``auto``: fused.
- ``compile``: ``on`` compiles each repeated block of the model (the classes its ``_no_split_modules``
  names: the decoder layers) with ``torch.compile`` for the time of training (:func:`compiled`):
  inductor fuses the element-wise work around the matmuls and its partitioner saves fewer activations for
  backward. ``auto``, for models of at least :data:`COMPILE_MIN_PARAMS` parameters where inductor has a
  compiler (a C++ compiler on CPU, triton on CUDA): the first three steps run eager and are timed, and
  the run compiles from the fourth only if the time expected saved beats the time expected to compile, cold
  or warm (tunelab.compiling); inductor caches the compiled kernels on disk (``TORCHINDUCTOR_CACHE_DIR``), so
  later runs of the same model compile in seconds.
- ``allocator``: ``reuse`` has glibc keep the memory a step frees for the next step (no block mapped on its
  own, no trimming: :func:`tunelab.runtime.reusing_freed_memory`), so that steps do not fault the same pages
  in again. ``auto``: reuse on CPU under glibc (the ``tunelab`` command runs under tcmalloc or jemalloc where
  installed: tunelab.malloc); on CUDA activations live in torch's caching allocator already.
- ``attention_probs``: ``recompute`` has eager attention keep only its inputs for backward and recompute
  the probabilities there (tunelab.attention: same gradients, a third less memory on long rows).
  ``auto``: recompute under eager attention, unless gradient checkpointing recomputes whole blocks.
- ``pad_to``: ``bucket`` pads each training batch of 32 tokens or more up to the next of a few lengths
  (:func:`tunelab.data.bucket_length`), so shapes repeat from step to step and the C allocator's heap stops
  growing with every new length; ``longest`` pads to the batch's longest row. ``auto``: bucket.
- ``weight_casts``, ``activations`` (tunelab.saved): ``recompute`` casts trained weights again in backward
  instead of keeping their bf16 copies (``keep``, the default, trades no speed for it); ``lean`` recomputes
  element-wise outputs from inputs kept anyway and keeps one tensor's casts once (``auto``: lean).
- ``lora_kernel``: ``fused`` trains each LoRA layer as one autograd operation (tunelab.lorakernel), ``peft``
  through PEFT's forward. ``auto``: fused, unless ``compile: on`` or the weights are sharded.
- ``threads``: intra-op threads; ``auto`` keeps torch's default (the physical cores).

Two more decide how the base model is loaded (:func:`load_options`, before it loads):

- ``attention``: ``auto`` is ``flash_attention_2`` on CUDA when the ``flash_attn`` package is installed and
  the run is in bf16/fp16, else ``sdpa`` (PyTorch's fused attention) on CUDA and ``eager`` on CPU, where the
  fused kernel's backward is slower (LoRA on the default model: 1.17x the tokens/s with eager);
- ``base_quantization``: ``4bit`` (QLoRA: NF4, double quantization, bf16 compute) or ``8bit`` base weights
  through bitsandbytes, on CUDA, for strategies that only add modules (``prepare_model_for_kbit_training``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tunelab import attention, lorakernel, malloc, saved
from tunelab.compiling import tracing
from tunelab.errors import RunError
from tunelab.losshead import supports_positions_head
from tunelab.models import default_attention
from tunelab.progress import status

#: below this many parameters a step is too short for compiling to pay back its compile time (auto: off)
COMPILE_MIN_PARAMS = 50_000_000


@dataclass
class Levers:
    attention: str = "sdpa"
    attention_probs: str = "keep"
    base_quantization: str = "none"
    loss_head: str = "full"
    frozen_weights: str = "fp32"
    optimizer_impl: str = "foreach"
    compile: str = "off"
    allocator: str = "system"
    malloc: str = "glibc"  #: the C allocator serving the process (tunelab.malloc), not a setting
    pad_to: str = "longest"
    weight_casts: str = "keep"
    activations: str = "keep"
    lora_kernel: str = "peft"
    threads: int = 0
    why: dict[str, str] = field(default_factory=dict)  #: for each auto lever left off: the reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_options(training, *, device: str, precision: str, changes_base: bool) -> tuple[Levers, dict[str, Any]]:
    """The loading levers (attention, base quantization) and the ``from_pretrained`` options they give; an
    explicit setting that cannot work here is a :class:`RunError` naming it."""
    lv = Levers()
    half = precision in ("bf16", "fp16")
    flash = device == "cuda" and half and importlib.util.find_spec("flash_attn") is not None
    if training.attention == "flash_attention_2" and not flash:
        raise RunError(
            "training.attention: flash_attention_2 needs CUDA, the flash-attn package and training.precision "
            f"bf16 or fp16 (here: {device}, {precision}, flash-attn "
            f"{'installed' if importlib.util.find_spec('flash_attn') else 'not installed'}); use auto or sdpa"
        )
    if training.attention == "auto":
        # on CPU, PyTorch's fused attention backward is slower than plain matmuls (docs/performance.md)
        lv.attention = "flash_attention_2" if flash else default_attention(device)
        if not flash:
            lv.why["attention"] = "flash_attention_2 needs CUDA, flash-attn and bf16/fp16"
    else:
        lv.attention = training.attention
    options: dict[str, Any] = {"attn_implementation": lv.attention}
    q = training.base_quantization
    if q != "none":
        problems = []
        if device != "cuda":
            problems.append("a CUDA GPU (this machine has none)")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("the bitsandbytes package (pip install 'tunelab[qlora]')")
        if changes_base:
            problems.append(
                "a strategy that only adds modules (this one trains base weights, which stay quantized)"
            )
        if problems:
            raise RunError(f"training.base_quantization: {q} needs {' and '.join(problems)}; use none")
        options["quantization_config"] = quantization_config(q, precision)
        options["device_map"] = {"": torch.cuda.current_device()}
        lv.base_quantization = q
    return lv, options


def frozen_in_bf16(training, *, precision: str, changes_base: bool, sharded: str | None) -> bool:
    """Whether :func:`resolve` will hold the frozen linear weights in bf16 (known before the model loads, so
    that a bf16 checkpoint loads straight into bf16: :func:`load_dtype`)."""
    return (
        training.frozen_weights in ("auto", "bf16")
        and precision == "bf16"
        and not changes_base
        and training.base_quantization == "none"
        and sharded is None
    )


def load_dtype(stored: torch.dtype, frozen_bf16: bool) -> torch.dtype:
    """The dtype to load a checkpoint stored in ``stored`` in: bf16 when its frozen linear weights will be
    held in bf16 anyway and the file holds bf16 (no fp32 copy of them ever exists; :func:`upcast_all_but_
    frozen_linears` then puts everything else in fp32, exactly, as bf16 values are fp32 values); fp32
    otherwise (an fp32 file loads as views of itself, and its frozen weights are cast afterwards)."""
    return torch.bfloat16 if frozen_bf16 and stored == torch.bfloat16 else torch.float32


def upcast_all_but_frozen_linears(model: torch.nn.Module, trained: set[int] | None = None) -> int:
    """Every floating parameter in fp32 except the frozen linear weights (:func:`_frozen_linear`; ``trained``
    is ``None`` before the strategies apply): the state :func:`cast_frozen_linears` leaves an fp32-loaded
    model in. Returns how many values were upcast."""
    keep = _frozen_linear(model, trained)
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in keep:
            p.data = p.data.float()
            n += p.numel()
    return n


def _frozen_linear(model: torch.nn.Module, trained: set[int] | None) -> set[int]:
    """The ids of the weights and biases of linear layers that do not train (not in ``trained``, the ids of
    every parameter an optimizer group holds, and not requiring grad; ``None``: before the strategies apply,
    when every parameter still requires grad) and that no other kind of module shares (an output layer tied
    to the input embeddings, whose lookups feed the fp32 residual stream)."""
    shared = {
        id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)
    }
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
        if id(p) not in shared and (trained is None or (id(p) not in trained and not p.requires_grad))
    }


def quantization_config(bits: str, precision: str):
    """bitsandbytes settings for ``4bit`` (QLoRA, Dettmers et al. 2023: NF4, double quantization, matmuls in
    the run's half precision) or ``8bit`` (LLM.int8())."""
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float16 if precision == "fp16" else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def resolve(
    training,
    model: torch.nn.Module,
    *,
    needs_logits: bool,
    changes_base: bool,
    precision: str,
    loaded: Levers,
    sharded: str | None = None,
) -> Levers:
    """The levers for this run, given the loading ones (``loaded``); an explicit setting that cannot work
    here is a :class:`RunError` naming it. ``sharded``: the engine (``fsdp``, ``deepspeed``) that holds the
    weights in shards, where the levers that act on whole weights stay off (config validation refuses them
    when set explicitly)."""
    lv = loaded
    lv.threads = torch.get_num_threads()
    why = lv.why
    shards = f"distributed: {sharded} holds the weights in shards" if sharded else None

    logits = "a strategy reads the training batch's logits" if needs_logits else None
    reason = logits or shards or supports_positions_head(model)
    if training.loss_head == "positions" and reason:
        raise RunError(f"training.loss_head: positions cannot be used here: {reason}; use auto or full")
    if training.loss_head == "auto" and reason:
        why["loss_head"] = reason
    lv.loss_head = "positions" if training.loss_head != "full" and not reason else "full"

    if training.frozen_weights == "bf16":
        if precision != "bf16":
            raise RunError(
                f"training.frozen_weights: bf16 needs training.precision bf16 (this run's is {precision}); "
                "use auto or fp32"
            )
        if changes_base:
            raise RunError(
                "training.frozen_weights: bf16 cannot be used with a strategy that changes base weights (full, "
                "layer-wise): the model it saves carries the frozen weights at their own precision; "
                "use auto or fp32"
            )
    if training.frozen_weights == "auto":
        if shards:
            why["frozen_weights"] = shards
        elif precision != "bf16":
            why["frozen_weights"] = f"precision is {precision}"
        elif changes_base:
            why["frozen_weights"] = "a strategy changes base weights; the saved model keeps them in fp32"
        elif lv.base_quantization != "none":
            why["frozen_weights"] = f"the base weights are quantized ({lv.base_quantization})"
    wanted = training.frozen_weights == "bf16" or (
        training.frozen_weights == "auto" and "frozen_weights" not in why
    )
    lv.frozen_weights = "bf16" if wanted else "fp32"

    lv.optimizer_impl = "fused" if training.optimizer_impl == "auto" else training.optimizer_impl

    if training.compile != "off":
        problem = (
            "the model names no repeated block to compile (_no_split_modules)"
            if not repeated_blocks(model)
            else compiler_missing(next(model.parameters()).device.type)
        )
        if training.compile == "on" and problem:
            raise RunError(f"training.compile: on cannot be used here: {problem}; use auto or off")
        total = sum(p.numel() for p in model.parameters())
        if training.compile == "auto" and not problem:
            small = f"the model has {total:,} parameters; compiling pays from {COMPILE_MIN_PARAMS:,}"
            problem = shards or (small if total < COMPILE_MIN_PARAMS else None)
        if training.compile == "auto" and problem:
            why["compile"] = problem
        lv.compile = "off" if problem else "on"
    lv.attention_probs = attention.resolve(training, model, lv.attention, why)
    lv.malloc = malloc.in_use()
    if training.allocator == "reuse" and lv.malloc != "glibc":
        msg = f"reuse tunes glibc's allocator, not {lv.malloc} (this process's: see TUNELAB_MALLOC)"
        raise RunError(f"training.allocator: {msg}; use auto or system")
    if training.allocator == "auto" and next(model.parameters()).device.type != "cpu":
        why["allocator"] = "activations live in torch's caching allocator on this device"
    elif training.allocator == "auto" and lv.malloc != "glibc":
        why["allocator"] = malloc.WHY[lv.malloc]
    wanted = training.allocator == "reuse" or (training.allocator == "auto" and "allocator" not in why)
    lv.allocator = "reuse" if wanted else "system"
    lv.pad_to = "bucket" if training.pad_to == "auto" else training.pad_to
    lv.weight_casts, lv.activations = saved.resolve(training, precision, sharded)
    lv.lora_kernel = lorakernel.resolve(training, model, sharded=sharded, why=why)
    if training.threads:
        torch.set_num_threads(training.threads)
        lv.threads = training.threads
    return lv


def cast_frozen_linears(model: torch.nn.Module, trained: set[int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Hold the fp32 weights and biases of linear layers that do not train (:func:`_frozen_linear`: not in
    ``trained``, the ids of every parameter an optimizer group holds, including per-task parts not active
    now) in ``dtype``; returns how many values changed dtype. A weight shared with another kind of module
    (an output layer tied to the input embeddings) stays as it is."""
    frozen = _frozen_linear(model, trained)
    n = 0
    for p in model.parameters():
        if id(p) in frozen and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def adamw(groups: list[dict], impl: str, **kwargs) -> torch.optim.AdamW:
    """AdamW with the chosen implementation (``fused`` where torch has it for these tensors, else foreach)."""
    if impl == "fused":
        params = [p for g in groups for p in g["params"]]
        devices = {p.device.type for p in params}
        if all(p.is_floating_point() for p in params) and devices <= {"cpu", "cuda"}:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        impl = "foreach"
    return torch.optim.AdamW(groups, foreach=impl == "foreach", **kwargs)


def own_storage(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own. transformers maps safetensors files and its
    tensors can stay views of the file: the mapped pages count in the resident set (the whole file, ~540 MB
    for the default model) for as long as one tensor still points into it, also after the frozen weights
    were cast to bf16."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def compile_mode(lv: Levers, setting: str) -> str:
    """How a training compiles: ``on`` (from its first step), ``auto`` (decided after its first eager steps
    from the time it expects to save and to spend: tunelab.compiling) or ``off``."""
    if lv.compile != "on":
        return "off"
    return "on" if setting == "on" else "auto"


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of the classes the model's ``_no_split_modules`` name (its decoder layers): the same code
    run once per layer, so one compiled graph serves them all."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def compiler_missing(device_type: str) -> str:
    """Why inductor cannot compile for this device here, or ``""``."""
    if device_type == "cuda":
        return "" if importlib.util.find_spec("triton") else "the triton package is not installed"
    if device_type != "cpu":
        return f"torch.compile is not set up for {device_type} here"
    if os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return ""
    return "no C++ compiler found (g++, c++ or clang++; or set CXX)"


@contextlib.contextmanager
def compiled(model: torch.nn.Module, on: bool, *, deferred: bool = False) -> Iterator[Callable[[], None]]:
    """Each repeated block compiled (dynamic shapes: batches of other lengths reuse the kernels) while the body
    runs, eager after it: generation and the measurements after training run the model as loaded; its module
    tree, parameters and state dict stay as they are. Yields the function that compiles them: called at once
    unless ``deferred`` (``compile: auto`` calls it when it decides that compiling pays)."""
    if not on:
        yield lambda: None
        return
    blocks = repeated_blocks(model)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    started = []
    settings = contextlib.ExitStack()  # torch settings changed for the time of training, restored after

    def start() -> None:
        if started:
            return
        # torch keeps a few graphs per code object (nn.Module's call, every block's) and silently runs eager
        # past that: start each training from none (the kernels stay cached on disk)
        torch._dynamo.reset()
        # a KV cache built at every training forward (transformers does when config.use_cache) is of no use
        # there, and its state changes each call, which would make every layer's graph recompile
        if use_cache:
            config.use_cache = False
        settings.enter_context(tracing(model))  # one graph for all blocks, traced once, kept in the cache
        for b in blocks:
            b.compile(dynamic=True)
        started.append(True)
        n, kind = len(blocks), type(blocks[0]).__name__
        status(f"compile: {n} {kind} blocks compile in the first step (~25-50 s cold on 2 cores; warm: seconds)")

    if not deferred:
        start()
    try:
        yield start
    finally:
        settings.close()
        if started:
            for b in blocks:
                b._compiled_call_impl = None  # what nn.Module.compile sets; None is its uncompiled default
            if use_cache:
                config.use_cache = use_cache
