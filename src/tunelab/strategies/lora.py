"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), through PEFT.

Each targeted linear layer ``W`` (d_out x d_in) gains a low-rank update ``W + (alpha / r) * B A`` with
``A`` (r x d_in, Kaiming-uniform init) and ``B`` (d_out x r, zero init), so the adapted model equals the
base model at step 0 and only ``r * (d_in + d_out)`` parameters per layer train. ``use_rslora`` scales by
``alpha / sqrt(r)`` instead (Kalajdzievski, 2023) which keeps updates stable at high rank; ``use_dora``
splits the weight into magnitude and direction and applies LoRA to the direction (Liu et al., 2024).

When to choose it: the default parameter-efficient method; near full fine-tuning quality on most
tasks at a few percent of the trainable parameters, mergeable into the weights (no inference cost).

Saved as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, dir)`` loads unchanged; ``merge`` folds it into plain weights.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from pydantic import Field

from tunelab.strategies.base import Adds, PerTaskConfig, register_strategy
from tunelab.strategies.peft_base import PeftMerge, PeftStrategy


class LoraConfig(PerTaskConfig):
    r: int = Field(16, gt=0, description="Rank of the update.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names (suffixes) or a regex to adapt; 'all-linear' = every linear layer but the head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head])."
    )


@register_strategy
class Lora(PeftStrategy, PeftMerge):
    name = "lora"
    summary = "Low-rank updates on chosen linear layers (DoRA and rsLoRA switches), via PEFT; mergeable."
    Config = LoraConfig
    default_lr = 2e-4
    declares = replace(PeftStrategy.declares, adds=frozenset({Adds.LORA_LAYERS}))

    def peft_config(self, model) -> PeftLoraConfig:
        c = self.config
        return PeftLoraConfig(
            task_type="CAUSAL_LM",
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules,
            bias=c.bias,
            use_dora=c.use_dora,
            use_rslora=c.use_rslora,
            modules_to_save=c.modules_to_save,
        )

    def own_parameters(self, model):
        own = super().own_parameters(model)
        if self.config.bias == "none":
            return own
        from peft.tuners.tuners_utils import BaseTunerLayer

        # bias "all": every module's bias; "lora_only": the biases of the layers LoRA adapts
        for mname, module in self.peft_model.named_modules():
            if self.config.bias == "lora_only" and not isinstance(module, BaseTunerLayer):
                continue
            target = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            bias = getattr(target, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and all(bias is not p for _, p in own):
                own.append((f"{mname}.bias", bias))
        return own
