"""``training.attention_probs``: whether eager attention keeps its probabilities for backward.

transformers' eager attention (plain matmuls and a softmax, tunelab's default on CPU, where PyTorch's fused
kernel has a slow backward) saves for backward the softmax's fp32 output and its cast to the half-precision
dtype: 6 bytes per query, key, head and row in every layer. On 8 rows of 530 tokens that is 8 x 9 heads x
530^2 x 6 bytes = 121 MB a layer, 3.6 GB for the default model's 30 layers, a third of a LoRA step's peak.

``recompute`` runs the model's own eager attention under non-reentrant activation checkpointing
(:func:`torch.utils.checkpoint.checkpoint`): forward saves only its inputs (the query, key and value, which
the projections' backward keeps anyway, and the mask), and backward runs the attention forward once more
before its own backward. The recomputed tensors are the same values from the same inputs and kernels, so
the gradients are those of ``keep`` (tests/test_levers.py); the cost is the attention's forward once more (its
two batched matmuls and the softmax, a few percent of a step). Compiled, inductor sees the same region and
keeps its inputs only too.

It acts for the time of training only (:func:`recomputing`): the model is switched to an attention
implementation registered under :data:`NAME` with transformers' ``AttentionInterface`` (and the eager mask
under the same name) and back to ``eager`` after, so evaluation, generation and saved configs are untouched.
Without gradients (the forward timed by ``compile: auto``, a teacher, a reference model) it is the eager
function itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.errors import RunError
from tunelab.models import unwrap

NAME = "tunelab_eager_recompute"  #: the attention implementation registered with transformers


def eager_function(module: torch.nn.Module) -> Callable | None:
    """The eager attention function of the modeling file ``module``'s class comes from (transformers names
    it ``eager_attention_forward`` in every file that dispatches through ``AttentionInterface``)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


def recompute_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """``module``'s own eager attention, its inner tensors recomputed in backward instead of kept; the
    attention weights it returns are ``None`` while gradients are recorded (none are kept to return)."""
    eager = eager_function(module)
    if not torch.is_grad_enabled():
        return eager(module, query, key, value, attention_mask, *args, **kwargs)

    def run(q, k, v, mask):
        return eager(module, q, k, v, mask, *args, **kwargs)[0]

    if not kwargs.get("dropout"):  # dropout on the cast probabilities would round otherwise than on fp32 ones
        query = _as_autocast(query)
    return checkpoint(run, query, key, value, attention_mask, use_reentrant=False), None


def _as_autocast(query: torch.Tensor) -> torch.Tensor:
    """The query cast as autocast would cast it for the attention's first matmul, so that the checkpoint keeps
    the half-precision copy the matmul reads instead of the fp32 tensor rotary embeddings leave (their cos and
    sin are fp32): half the bytes, the same values and gradients, since a cast is exact and deterministic.
    Not the key: with grouped-query attention it is repeated for each group of heads after this point, and
    backward sums the groups' gradients in the key's dtype, which must stay fp32 to give the same sums."""
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return query.to(torch.get_autocast_dtype(device))
    return query


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers knows, with eager attention's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, recompute_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def _pretrained(model: torch.nn.Module):
    """The transformers model inside the PEFT wrappers (:func:`tunelab.models.unwrap`), or ``None``."""
    from transformers import PreTrainedModel

    top = unwrap(model)
    return top if isinstance(top, PreTrainedModel) else None


def unsupported(model: torch.nn.Module, attention: str) -> str:
    """Why the attention probabilities of this run cannot be recomputed, or ``""``."""
    if attention != "eager":
        return f"attention {attention} keeps no probabilities for backward (its kernel recomputes them)"
    top = _pretrained(model)
    if top is None or not top._can_set_attn_implementation():
        return "the model does not dispatch its attention through transformers' AttentionInterface"
    if not any(eager_function(m) for m in model.modules() if type(m).__name__.endswith("Attention")):
        return "the model's modeling file has no eager_attention_forward"
    return ""


def resolve(training: Any, model: torch.nn.Module, attention: str, why: dict[str, str]) -> str:
    """``recompute`` or ``keep`` for this run; an explicit ``recompute`` that cannot work here is a
    :class:`RunError`, an ``auto`` left at ``keep`` says why in ``why``."""
    setting = training.attention_probs
    if setting == "keep":
        return "keep"
    problem = unsupported(model, attention)
    if setting == "recompute" and problem:
        raise RunError(f"training.attention_probs: recompute cannot be used here: {problem}; use auto or keep")
    if setting == "auto" and not problem and training.gradient_checkpointing:
        problem = "gradient_checkpointing recomputes whole blocks already"
    if setting == "auto" and problem:
        why["attention_probs"] = problem
        return "keep"
    return "recompute"


@contextlib.contextmanager
def recomputing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """The model's attention is :data:`NAME` while the body runs, what it was (``eager``) again after it."""
    top = _pretrained(model) if on else None
    if top is None:
        yield
        return
    register()
    was = top.config._attn_implementation
    top.set_attn_implementation(NAME)
    try:
        yield
    finally:
        top.set_attn_implementation(was)
