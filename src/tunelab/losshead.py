"""The output layer and the loss on the positions that carry loss only (``training.loss_head``).

A causal LM's forward applies its output layer (the vocabulary head: hidden size × vocabulary) to every
position and the loss then reads the positions whose next token is a label. In supervised fine-tuning most
positions are prompt or padding, and the vocabulary is large (49,152 for SmolLM2): the head's matmul, the
fp32 logits, their log-softmax and its gradient for every position of the batch are a large share of a
step's time and most of its peak memory (docs/performance.md).

:class:`PositionsHead` changes what the model's own head sees, without knowing the model: for one forward
it puts a pre-hook on the output layer (``get_output_embeddings()`` of the model inside any PEFT wrappers,
also when a tuner wraps that layer) that keeps the hidden states at the loss positions and hands the layer
an empty sequence, so the model's forward computes no logits. :meth:`PositionsHead.loss` then applies the
same layer to the kept states, a chunk of positions at a time, and sums the cross-entropy in fp32: the loss
and its gradients are those of the full head to float tolerance (tests/test_levers.py). When there are
more positions than one chunk holds, each chunk is recomputed in backward (activation checkpointing), so
the logits of at most one chunk exist at any time.

Models whose forward does more to the logits than the head (a final soft-cap, a logit scale) keep the full
head, as do runs where a strategy reads the training batch's logits (``Need.LOGITS``); ``auto`` decides.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.data import IGNORE
from tunelab.models import unwrap

#: logits elements per chunk (2^25: 128 MiB in fp32): 682 positions of a 49,152-token vocabulary
CHUNK_ELEMENTS = 1 << 25
#: config attributes of models whose forward changes the logits after the head
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def supports_positions_head(model: torch.nn.Module) -> str | None:
    """None when the loss may be taken on loss positions through the model's own output layer, else why not."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings"
    for attr in LOGIT_TRANSFORMS:
        value = getattr(inner.config, attr, None)
        if value not in (None, 1, 1.0, False):
            return f"the model's forward changes the logits after the head ({attr}: {value})"
    return None


class PositionsHead:
    """The task loss from the output layer applied to the loss positions only (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.head = unwrap(model).get_output_embeddings()
        vocab = int(getattr(self.head, "out_features", 0) or self.head.weight.shape[0])
        self.chunk = max(1, CHUNK_ELEMENTS // vocab)
        self._keep: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._autocast: tuple[str, torch.dtype] | None = None

    @contextlib.contextmanager
    def capturing(self, labels: torch.Tensor):
        """During the block, the output layer's input is kept at the positions whose next token is a label
        (``labels``: the batch's, unshifted) and the layer itself sees an empty sequence. The hook is
        registered last, so other hooks on the layer (a classification head reading its input) still see
        every position."""
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE
        self._keep, self._targets, self._hidden = keep, labels[:, 1:][keep[:, :-1]], None
        handle = self.head.register_forward_pre_hook(self._pre)
        try:
            yield self
        finally:
            handle.remove()
            self._keep = None

    def _pre(self, module, args):
        h = args[0]
        extra = h.shape[1] - self._keep.shape[1]  # prompt learners prepend virtual tokens
        h = h[:, extra:] if extra > 0 else h
        self._hidden = h[self._keep]
        device = h.device.type
        self._autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return (h[:, :0], *args[1:])

    def loss(self, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Cross-entropy of the kept positions: summed and divided by ``num_items_in_batch`` (the Trainer's
        count over the whole accumulated step) when given, else their mean, as transformers' causal-LM loss."""
        if self._hidden is None:
            raise RuntimeError("PositionsHead.loss: the model's output layer did not run in capturing()")
        hidden, targets = self._hidden, self._targets
        self._hidden = None
        n = hidden.shape[0]
        # the head computes as the model's own would have: under the autocast its forward ran in (the Trainer
        # autocasts the model's forward, not the loss); an fp32 head was 5x slower on a CPU's bf16 matmuls
        cast = self._autocast
        with torch.autocast(cast[0], dtype=cast[1]) if cast else contextlib.nullcontext():
            if n == 0:  # no position carries loss: a zero that still reaches every trained parameter
                total = hidden.sum() * 0.0
            elif n <= self.chunk:
                total = _ce_sum(self.head, hidden, targets)
            else:
                total = sum(
                    checkpoint(
                        _ce_sum,
                        self.head,
                        hidden[i : i + self.chunk],
                        targets[i : i + self.chunk],
                        use_reentrant=False,
                    )
                    for i in range(0, n, self.chunk)
                )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return total / max(n, 1)


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    device = hidden.device.type
    frozen = type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())
    if frozen and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        bias = head.bias.to(dtype) if head.bias is not None else None
        logits = _FrozenLinear.apply(hidden, head.weight, bias, dtype)
    else:  # the layer's own forward, not its __call__: hooks on it (ours, a classifier's) are not re-run
        logits = type(head).forward(head, hidden)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _FrozenLinear(torch.autograd.Function):
    """A frozen linear layer as autocast computes it (input and weight cast to ``dtype``), except that backward
    casts the weight again instead of keeping the cast: for a vocabulary head tied to fp32 input embeddings
    that copy is 56 MB on the default model (49,152 x 576 in bf16), held from the head to its backward, at the
    step's peak."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xb = x.to(dtype)
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(xb, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = dy.to(ctx.dtype) @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return (dx.to(ctx.x_dtype) if dx is not None else None), None, None, None
