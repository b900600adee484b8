"""``training.weight_casts``: under mixed precision, autocast casts each trained fp32 weight to bf16 (or fp16)
for its matmul, and autograd keeps that copy for backward until the layer's gradient is computed; autocast's
own cache keeps it for the rest of the forward as well. With full fine-tuning that is a second, half-size
copy of every weight held through the step (270 MB on the default model). ``recompute`` turns autocast's
cache off and has autograd keep a reference to the fp32 weight instead of the copy, casting it again when
backward needs it: the same values (a cast is exact and deterministic), one cast more per weight and step.
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.errors import RunError


def _pack(t: torch.Tensor):
    """What autograd keeps of a saved tensor: for a cast of a trained weight (or a view of one), the weight
    and how to cast and view it again; anything else as it is."""
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or fn.name() != "ToCopyBackward0":
        return t
    weight = getattr(fn.next_functions[0][0], "variable", None)  # AccumulateGrad holds the leaf it feeds
    if weight is None or weight.dtype == base.dtype or weight.shape != base.shape:
        return t
    return (weight, base.dtype, t.size(), t.stride(), t.storage_offset())


def _unpack(x):
    if isinstance(x, tuple):
        weight, dtype, size, stride, offset = x
        return weight.detach().to(dtype).as_strided(size, stride, offset)
    return x


def recast_in_backward(on: bool) -> contextlib.AbstractContextManager:
    """While the body runs (a training step: its forward registers what backward will unpack), casts of
    trained weights are kept as references to the weights and cast again in backward."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if on else contextlib.nullcontext()


def resolve(training, precision: str, sharded: str | None) -> str:
    """``recompute`` or ``keep`` (the default) for this run. Not ``auto``: it trades speed for memory, like
    gradient checkpointing (full fine-tuning on tickets: 2% less peak, 5-7% fewer tokens/s in one run, within
    the spread; docs/performance.md).
    """
    if training.weight_casts == "recompute":
        if precision not in ("bf16", "fp16"):
            problem = f"precision is {precision}: no weight is cast"
        elif sharded:
            problem = f"distributed: {sharded} casts the weights itself"
        else:
            return "recompute"
        raise RunError(f"training.weight_casts: recompute cannot be used here: {problem}; use keep")
    return "keep"
