"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), through PEFT.

Each targeted linear layer ``W`` (d_out x d_in) gains a low-rank update ``W + (alpha / r) * B A`` with
``A`` (r x d_in, Kaiming-uniform init) and ``B`` (d_out x r, zero init), so the adapted model equals the
base model at step 0 and only ``r * (d_in + d_out)`` parameters per layer train. ``use_rslora`` scales by
``alpha / sqrt(r)`` instead (Kalajdzievski, 2023) which keeps updates stable at high rank; ``use_dora``
splits the weight into magnitude and direction and applies LoRA to the direction (Liu et al., 2024).

Saved as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, dir)`` loads unchanged; ``merge`` folds it into plain weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from pydantic import Field

from tunelab.strategies.base import Strategy, StrategyConfig, StrategyError, register_strategy


class LoraConfig(StrategyConfig):
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
class Lora(Strategy):
    name = "lora"
    Config = LoraConfig
    default_lr = 2e-4

    def peft_config(self) -> PeftLoraConfig:
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

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            return get_peft_model(model, self.peft_config())
        except ValueError as e:
            # PEFT says "Target modules ... not found"; add what the model does have.
            names = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise StrategyError(
                f"strategy lora: target_modules={self.config.target_modules!r} matched nothing usable ({e}). "
                f"Linear layers in this model: {', '.join(names)}"
            ) from None

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        return PeftModel.from_pretrained(base_model, out_dir)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.merge_and_unload()
