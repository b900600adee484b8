"""What a transformer is made of, asked of the model itself: its blocks, and the role of each part of a block
(attention, MLP, norm), for the strategies that act on kinds of modules (layer-wise, bottleneck adapters,
dropout, the student cut).

A role is decided by what a module *is*, the way every Hugging Face architecture builds it:

- **attention**: a module that declares its heads (``head_dim``, ``num_heads`` or ``num_attention_heads``
  as an attribute), as Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX and their relatives all do;
- **norm**: a module with a single weight vector and an epsilon (``eps`` or ``variance_epsilon``:
  LayerNorm, RMSNorm), or a ``normalized_shape``;
- **mlp**: a module that is neither, holds two or more weight matrices, and no attention inside.

A module tunelab itself added to a block (a bottleneck adapter) has no role. Only when a module answers
none of these questions does its class name decide (the stated fallback:
``*Attention``, ``*MLP``, ``*Norm*``), so a renamed class of a known shape is still recognised, and an
architecture whose modules answer nothing still works where its names follow the usual pattern.
"""

from __future__ import annotations

from typing import Literal

import torch

Role = Literal["attention", "mlp", "norms"]

_HEADS = ("head_dim", "num_heads", "num_attention_heads")
#: set (True) on the modules tunelab adds to a block (bottleneck adapters): they have no role in it
ADDED = "tunelab_added"
_EPS = ("eps", "variance_epsilon")


class StrategyError(ValueError):
    """A strategy cannot be applied to this model as configured (e.g. target modules that match nothing, a
    model without recognisable blocks)."""


def block_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """Where the transformer blocks are held: the module and attribute of the ModuleList whose length is the
    model's layer count (its config's), the first one in module order."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            owner, _, attr = path.rpartition(".")
            return model.get_submodule(owner), attr
    raise StrategyError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (:func:`block_list`)."""
    owner, attr = block_list(model)
    return list(getattr(owner, attr))


def _declares_heads(module: torch.nn.Module) -> bool:
    return any(isinstance(getattr(module, a, None), int) for a in _HEADS)


def _is_norm(module: torch.nn.Module) -> bool:
    if hasattr(module, "normalized_shape"):
        return True
    own = list(module.parameters(recurse=False))
    return any(hasattr(module, a) for a in _EPS) and bool(own) and all(p.dim() == 1 for p in own)


def role(module: torch.nn.Module) -> Role | None:
    """The module's role in its block, asked of the module (see the module docstring); the class name only
    when it answers nothing. A module tunelab added (``ADDED``) has none."""
    if getattr(module, ADDED, False):
        return None
    if _declares_heads(module):
        return "attention"
    if _is_norm(module):
        return "norms"
    matrices = [p for p in module.parameters() if p.dim() == 2]
    if len(matrices) >= 2 and not any(_declares_heads(m) for m in module.modules()):
        return "mlp"
    name = type(module).__name__  # the stated fallback: the usual class names
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "mlp"
    if "Norm" in name:
        return "norms"
    return None


def part(block: torch.nn.Module, wanted: Role) -> torch.nn.Module:
    """The block's one direct child with role ``wanted``."""
    found = [m for m in block.children() if role(m) == wanted]
    if len(found) != 1:
        roles = {n: role(m) for n, m in block.named_children()}
        raise StrategyError(
            f"block {type(block).__name__} has {len(found)} children with role {wanted} (its children's roles: "
            f"{roles}); tunelab recognises attention by its heads, norms by their epsilon, an MLP by its weight "
            "matrices"
        )
    return found[0]
