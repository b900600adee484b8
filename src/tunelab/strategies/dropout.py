"""Dropout control: set the dropout rates a model and its adapters use while training (Srivastava et al.,
2014). Dropout regularises towards smoother solutions and, as a fine-tuning regulariser, reduces
overfitting of small task sets.

- ``attention``: attention-probability dropout (``attention_dropout`` of Llama-family attention, the
  attention ``nn.Dropout`` of GPT-2-family blocks);
- ``hidden``: dropout on the output of each attention and MLP sub-layer, before the residual add (as BERT's
  ``hidden_dropout_prob`` and GPT-2's ``resid_pdrop``; added by forward hooks, so it never touches the
  residual stream itself);
- ``lora``: the dropout on LoRA inputs.

A rate left unset is not changed. Evaluation runs in eval mode, so no dropout applies there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.strategies.anatomy import role
from tunelab.strategies.base import (
    Adds,
    Regularizer,
    StrategyConfig,
    StrategyError,
    register_strategy,
    transformer_blocks,
    unwrap,
)


class DropoutConfig(StrategyConfig):
    attention: float | None = Field(None, ge=0, lt=1, description="Attention dropout.")
    hidden: float | None = Field(None, ge=0, lt=1, description="Dropout on attention and MLP outputs.")
    lora: float | None = Field(None, ge=0, lt=1, description="Dropout on LoRA inputs.")


def _hidden_hook(p: float):
    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    return hook


@register_strategy
class Dropout(Regularizer):
    name = "dropout"
    summary = "Regularizer: attention, hidden and LoRA dropout rates while training."
    Config = DropoutConfig

    @classmethod
    def check(cls, config, stack):
        if config.lora is not None and not stack.adds(Adds.LORA_LAYERS):
            raise ValueError(
                "dropout.lora: no strategy in this stack adds LoRA layers, so the option would do nothing; "
                "add lora to the strategies or remove the option"
            )

    def apply(self, model):
        c = self.config
        inner = unwrap(model)
        for block in transformer_blocks(inner):
            for child in block.children():
                kind = role(child)
                if kind == "attention" and c.attention is not None:
                    if hasattr(child, "attention_dropout"):  # Llama family: a rate passed to the attention kernel
                        child.attention_dropout = c.attention
                    elif isinstance(getattr(child, "attn_dropout", None), torch.nn.Dropout):  # GPT-2 family
                        child.attn_dropout.p = c.attention
                    else:
                        raise StrategyError(
                            f"dropout.attention: the attention of {type(block).__name__} ({type(child).__name__}) "
                            "has neither an attention_dropout rate nor an attn_dropout module, so the option "
                            "would do nothing; remove it (hidden dropout acts on any model)"
                        )
                if kind in ("attention", "mlp") and c.hidden is not None:
                    child.register_forward_hook(_hidden_hook(c.hidden))
        if c.lora is not None:
            from peft.tuners.lora import LoraLayer

            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for name in list(m.lora_dropout.keys()):
                        m.lora_dropout[name] = torch.nn.Dropout(c.lora)
        return model
