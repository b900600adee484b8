"""Dropout control: set the dropout rates a model and its adapters use while training (Srivastava et al.,
2014). Dropout regularises towards smoother solutions and, as a fine-tuning regulariser, reduces
overfitting of small task sets.

- ``attention``: attention-probability dropout (``attention_dropout`` of Llama-family attention, the
  attention ``nn.Dropout`` of GPT-2-family blocks);
- ``hidden``: dropout on each block's output (added by a forward hook where the architecture has none);
- ``lora``: the dropout on LoRA inputs.

A rate left unset is not changed. Evaluation runs in eval mode, so no dropout applies there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.strategies.base import Regularizer, StrategyConfig, register_strategy, transformer_blocks, unwrap


class DropoutConfig(StrategyConfig):
    attention: float | None = Field(None, ge=0, lt=1, description="Attention dropout.")
    hidden: float | None = Field(None, ge=0, lt=1, description="Dropout on each block's output.")
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
    Config = DropoutConfig
    phase = 3

    def apply(self, model):
        c = self.config
        inner = unwrap(model)
        for block in transformer_blocks(inner):
            for child in block.children():
                if not type(child).__name__.endswith("Attention") or c.attention is None:
                    continue
                if hasattr(child, "attention_dropout"):  # Llama family: a rate passed to the attention kernel
                    child.attention_dropout = c.attention
                if isinstance(getattr(child, "attn_dropout", None), torch.nn.Dropout):  # GPT-2 family
                    child.attn_dropout.p = c.attention
            if c.hidden is not None:
                block.register_forward_hook(_hidden_hook(c.hidden))
        if c.lora is not None:
            from peft.tuners.lora import LoraLayer

            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for name in list(m.lora_dropout.keys()):
                        m.lora_dropout[name] = torch.nn.Dropout(c.lora)
        return model
