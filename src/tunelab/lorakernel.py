"""``training.lora_kernel``: each LoRA-adapted linear layer as one autograd operation while training.

PEFT's LoRA layer computes ``base(x) + B(A(dropout(x))) * scale`` as separate modules and operators: under
autocast the input is cast to bf16 once for the base layer and again for ``A``, ``A`` and ``B`` are cast, the
adapter's output is scaled and added in two more element-wise passes, and backward walks a node for each
(about ten per layer: casts, two or three matmuls, the product with the scale, the sum). On a CPU, where a
step of the default model on short rows spends more time around its matmuls than in them, those passes
and nodes are a sizeable share of a LoRA step (docs/performance.md).

``fused`` gives each eligible layer (:func:`eligible`) a forward of its own for the time of training
(:func:`fusing`): one :class:`LoraLinear` autograd function that computes ``x W^T + scale (x A^T) B^T`` with the
adapter's product added into the base's output by the matmul itself (``addmm`` with ``alpha = scale``), and
in backward the input gradient ``dy W + scale (dy B) A`` the same way, plus ``A``'s and ``B``'s gradients. The
input is cast to the compute dtype once per tensor, not once per layer: the query, key and value projections
read the same hidden states, as do the gate and up projections, and the first cast is kept for the others
(the same values: a cast is exact and deterministic). The input's gradient is returned in the input's own
dtype, so the projections' gradients are summed in fp32 as before.

The arithmetic is PEFT's up to rounding: the matmuls are the same, and the adapter's product is added to
the base's before the result is rounded to bf16 instead of after (in fp32 without autocast, the same values
to float tolerance: tests/test_lora_kernel.py). LoRA dropout draws its mask here (a Bernoulli draw per input
element, as ``nn.Dropout`` does, from the same generator), so a run with dropout draws other masks than one
with ``peft``; a resumed run draws the same ones as the run it resumes.

A call falls back to PEFT's own forward whenever its state is not the plain case: adapters disabled or
merged, several adapters active or mixed in one batch (``adapter_names``), a LoRA variant (DoRA, aLoRA, ...)
on the active adapter, a bias on ``B``, a trained base weight, hooks on the layer's parts, weights
in another dtype than the input without autocast, or inside a graph ``torch.compile`` traces (inductor fuses
these passes itself). Evaluation and generation after training run PEFT's forward: the layers get theirs
back when training ends.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from tunelab.errors import RunError


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def eligible(module: torch.nn.Module) -> bool:
    """Whether a module can take the fused forward at all: PEFT's LoRA layer over a plain linear layer whose
    weight is not stored transposed (``fan_in_fan_out``) and whose forward nothing else replaced. Its state
    is checked at each call."""
    return (
        type(module) is _lora_linear_class()
        and type(module.get_base_layer()) is torch.nn.Linear
        and not getattr(module, "fan_in_fan_out", False)
        and "forward" not in module.__dict__
    )


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that can take the fused forward."""
    return [m for m in model.modules() if eligible(m)]


def resolve(training: Any, model: torch.nn.Module, *, sharded: str | None, why: dict) -> str:
    """``fused`` or ``peft`` for this run; an explicit ``fused`` that cannot work here is a :class:`RunError`,
    an ``auto`` left at ``peft`` says why in ``why``."""
    setting = training.lora_kernel
    if setting == "peft":
        return "peft"
    if sharded:
        problem = f"distributed: {sharded} holds the weights in shards"
    elif not lora_layers(model):
        problem = "the model has no LoRA layer over a plain linear layer"
    else:
        problem = ""
    if setting == "fused" and problem:
        raise RunError(f"training.lora_kernel: fused cannot be used here: {problem}; use auto or peft")
    if setting == "auto" and not problem and training.compile == "on":
        problem = "compile is on: inductor fuses the LoRA layers' element-wise work itself"
    if setting == "auto" and problem:
        why["lora_kernel"] = problem
        return "peft"
    return "fused"


class LoraLinear(torch.autograd.Function):
    """``y = x W^T + b + scale * (d(x) A^T) B^T`` in ``dtype``, with ``d`` the dropout given by ``keep`` (a
    boolean mask, ``None`` for none) and ``p``. ``xb`` is ``x`` cast to ``dtype`` (detached: it may serve
    several layers), the gradient of ``x`` is returned in ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, xb, keep, p, weight, bias, lora_a, lora_b, scale, dtype):
        shape = x.shape
        xb = xb.reshape(-1, shape[-1])
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        if keep is None:
            xa = xb
        else:  # dropout on the adapter's input, in x's precision as nn.Dropout would, then cast
            xa = (x.reshape(-1, shape[-1]) * keep.reshape(-1, shape[-1])).mul_(1.0 / (1.0 - p)).to(dtype)
        t = xa @ a.t()
        y = xb @ w.t() if bias is None else torch.addmm(bias.to(dtype), xb, w.t())
        y.addmm_(t, b.t(), alpha=scale)
        ctx.save_for_backward(xb, xa, t, keep, w, a, b)
        ctx.scale, ctx.p, ctx.x_dtype, ctx.shape = scale, p, x.dtype, shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xb, xa, t, keep, w, a, b = ctx.saved_tensors
        s = ctx.scale
        dy = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        need = ctx.needs_input_grad
        g = dy @ b  # the gradient of the adapter's output before B, unscaled
        d_b = (dy.t() @ t).mul_(s) if need[7] else None
        d_a = (g.t() @ xa).mul_(s) if need[6] else None
        d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need[5] else None
        dx = None
        if need[0]:
            dx = dy @ w
            if keep is None:
                dx.addmm_(g, a, alpha=s)
                dx = dx.to(ctx.x_dtype)
            else:
                da = (g @ a).to(ctx.x_dtype).mul_(keep.reshape(dx.shape)).mul_(s / (1.0 - ctx.p))
                dx = da.add_(dx.to(ctx.x_dtype))
            dx = dx.view(ctx.shape)
        return dx, None, None, None, None, d_bias, d_a, d_b, None, None


class _CastOnce:
    """The last input cast, kept (weakly) for the next layer that casts the same tensor to the same dtype."""

    def __init__(self):
        self.slot: tuple | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x.detach()
        s = self.slot
        if s is not None and s[0]() is x and s[1] == x._version and s[2] == dtype:
            xb = s[3]()
            if xb is not None:
                return xb
        xb = x.detach().to(dtype)
        self.slot = (weakref.ref(x), x._version, dtype, weakref.ref(xb))
        return xb


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA layer's forward as one :class:`LoraLinear` when its state is the plain case, else PEFT's."""
    peft_forward = type(self).forward
    if args or kwargs or torch.compiler.is_compiling() or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if name not in self.lora_A or name in self.lora_variant:
        return peft_forward(self, x, *args, **kwargs)
    base, lora_a, lora_b, dropout = self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    if (
        lora_b.bias is not None
        or base.weight.requires_grad
        or any(_has_hooks(m) for m in (self, base, lora_a, lora_b, dropout))
        or not x.is_floating_point()
    ):
        return peft_forward(self, x, *args, **kwargs)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = x.dtype
        if base.weight.dtype != dtype or lora_a.weight.dtype != dtype or lora_b.weight.dtype != dtype:
            return peft_forward(self, x, *args, **kwargs)
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return peft_forward(self, x, *args, **kwargs)
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p) if p > 0 else None
    xb = self._tunelab_cast(x, dtype)
    with torch.autocast(device, enabled=False):
        return LoraLinear.apply(
            x, xb, keep, p, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name], dtype
        )


@contextlib.contextmanager
def fusing(model: torch.nn.Module, on: bool) -> Iterator[int]:
    """While the body runs, each eligible LoRA layer of ``model`` has the fused forward; yields how many."""
    layers = lora_layers(model) if on else []
    cast = _CastOnce()
    for m in layers:
        m._tunelab_cast = cast
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_tunelab_cast", None)
