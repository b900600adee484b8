"""Full fine-tuning: every parameter of the model trains.

The baseline every other strategy is measured against. Highest capacity, and the most forgetting and memory:
AdamW keeps two fp32 moments per parameter, so optimizer state alone is 8 bytes x parameters.
Saves a standalone model (``save_pretrained`` with safetensors); there is nothing to merge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from tunelab.strategies.base import Declaration, Strategy, StrategyConfig, register_strategy


class FullConfig(StrategyConfig):
    train_embeddings: bool = Field(True, description="Also train the token embeddings (and a tied output head).")


@register_strategy
class Full(Strategy):
    name = "full"
    summary = "Every weight trains; the artefact is a standalone model."
    Config = FullConfig
    default_lr = 2e-5
    # its artefact is the whole model, whatever its architecture became (a cut student's too)
    declares = Declaration(artefact="full", exclusive=True, changes_base_weights=True)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def own_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        frozen = set() if self.config.train_embeddings else {id(model.get_input_embeddings().weight)}
        return [(n, p) for n, p in model.named_parameters() if id(p) not in frozen]

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    @classmethod
    def load(cls, base_model: torch.nn.Module | None, out_dir: Path) -> torch.nn.Module:
        from tunelab.models import load_model

        return load_model(out_dir)
