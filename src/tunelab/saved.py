"""What autograd keeps for backward, and two levers that have it keep less for the same gradients, bit for bit.

``training.weight_casts``: under mixed precision, autocast casts each trained fp32 weight to bf16 (or fp16) for
its matmul, and autograd keeps that copy for backward until the layer's gradient is computed; autocast's own
cache keeps it for the rest of the forward as well. With full fine-tuning that is a second, half-size copy of
every weight held through the step (270 MB on the default model). ``recompute`` turns autocast's cache off and
has autograd keep a reference to the fp32 weight instead of the copy, casting it again when backward needs
it: the same values (a cast is exact and deterministic), one cast more per weight and step.

``training.activations``, ``lean`` (the ``auto``), does two things:

- an element-wise op whose backward keeps all of its inputs (SiLU and GELU keep their input, a product of two
  tensors that both need gradients keeps both) can give its output again from them. When a later op keeps
  that output for its own backward (the product of a gated MLP keeps SiLU's output; the RMSNorm weight's
  product keeps the normalised input, in fp32; the down projection keeps the gated product), autograd keeps
  the recipe instead and computes the output again when that backward needs it: the same kernel on the same
  values, so the same bits, for one element-wise op more;
- under autocast each linear layer casts its input itself, so the query, key and value projections keep
  three bf16 copies of one tensor (with LoRA, each adapter's first matrix does), the gate and up projections
  two: the casts of one tensor to one dtype and layout are kept once.

On the default model, 8 rows of 128 tokens, that is 337 MB recomputed and 108 MB shared of the 1.3 GB full
fine-tuning keeps, 96 and 105 MB with LoRA (docs/performance.md). Outputs of compiled blocks carry no autograd
history here: inductor's partitioner chooses what they keep.

Both act through :func:`torch.autograd.graph.saved_tensors_hooks` around a training step (:func:`keeping_less`).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from tunelab.errors import RunError

#: element-wise ops whose output can be computed again from the inputs their backward keeps: the op, and the
#: saved inputs it takes (autograd's names); a product qualifies only when it keeps both factors
_RECOMPUTABLE = {
    "SiluBackward0": (torch.nn.functional.silu, ("_saved_self",)),
    "GeluBackward0": (
        lambda x, approximate: torch.nn.functional.gelu(x, approximate=approximate),
        ("_saved_self", "_saved_approximate"),
    ),
    "MulBackward0": (torch.mul, ("_saved_self", "_saved_other")),
}


def _recast(base: torch.Tensor, fn) -> Any:
    """For a cast (``fn``: its ``ToCopyBackward0``) of a trained weight: the weight and the dtype to cast it to
    again; else ``None``."""
    weight = getattr(fn.next_functions[0][0], "variable", None)  # AccumulateGrad holds the leaf it feeds
    if weight is None or weight.dtype == base.dtype or weight.shape != base.shape:
        return None
    return ("cast", weight, base.dtype)


def _recipe(base: torch.Tensor, fn) -> Any:
    """For the output of an op of :data:`_RECOMPUTABLE` (``fn``: its node) whose backward keeps what it needs:
    the node, which holds the inputs, and the layout to check the recomputed output against; else ``None``."""
    if any(f is None for f, _ in fn.next_functions):  # an input without gradient is not kept by a product
        return None
    return ("op", fn, base.size(), base.stride())


def _packer(recast: bool, lean: bool):
    casts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # the first cast of each tensor kept

    def shared(base: torch.Tensor, fn) -> Any:
        """For a cast (``fn``: its ``ToCopyBackward0``) of a tensor another saved cast to the same dtype and
        layout was made from: that one."""
        if fn.next_functions[0][0] is None:
            return None
        source, index = fn.next_functions[0]  # the node that made the tensor cast, and which of its outputs
        first = casts.setdefault((source, index, base.dtype, base.shape, base.stride()), base)
        return None if first is base else ("same", first)

    def pack(t: torch.Tensor):
        """What autograd keeps of a saved tensor ``t`` (or of a view of it, viewed again after)."""
        base = t._base if t._base is not None else t
        fn = base.grad_fn
        if fn is None:
            return t
        name, how = fn.name(), None
        if name == "ToCopyBackward0":
            how = (_recast(base, fn) if recast else None) or (shared(base, fn) if lean else None)
        elif lean and name in _RECOMPUTABLE:
            how = _recipe(base, fn)
        return t if how is None else (how, t.size(), t.stride(), t.storage_offset())

    return pack


def _unpack(x):
    if not isinstance(x, tuple):
        return x
    how, size, stride, offset = x
    if how[0] == "cast":
        _, weight, dtype = how
        base = weight.detach().to(dtype)
    elif how[0] == "same":
        base = how[1]
    else:
        _, fn, base_size, base_stride = how
        op, inputs = _RECOMPUTABLE[fn.name()]
        base = op(*(getattr(fn, name) for name in inputs))
        if base.stride() != base_stride:  # the view below needs the layout the forward's output had
            base = torch.empty_strided(base_size, base_stride, dtype=base.dtype, device=base.device).copy_(base)
    return base.as_strided(size, stride, offset)


def keeping_less(recast: bool, lean: bool) -> contextlib.AbstractContextManager:
    """While the body runs (a training step: its forward registers what backward will unpack), casts of
    trained weights are kept as references to the weights (``recast``); recomputable element-wise outputs as
    recipes, and the casts of one tensor once (``lean``)."""
    if not (recast or lean):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_packer(recast, lean), _unpack)


def resolve(training, precision: str, sharded: str | None) -> tuple[str, str]:
    """``weight_casts`` and ``activations`` for this run. ``weight_casts`` has no ``auto``: it trades
    speed for memory, like gradient checkpointing (full fine-tuning on tickets: 2% less peak, 5-7% fewer
    tokens/s in one run, within the spread; docs/performance.md). ``activations``' ``auto`` is
    lean: one element-wise op more per output, within the spread."""
    casts = "keep"
    if training.weight_casts == "recompute":
        if precision not in ("bf16", "fp16"):
            problem = f"precision is {precision}: no weight is cast"
        elif sharded:
            problem = f"distributed: {sharded} casts the weights itself"
        else:
            problem = ""
        if problem:
            raise RunError(f"training.weight_casts: recompute cannot be used here: {problem}; use keep")
        casts = "recompute"
    return casts, "keep" if training.activations == "keep" else "lean"
