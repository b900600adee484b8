"""Prompt-engineering baselines: the untouched model, prompted, scored with the same metrics as a trained
run — the row every comparison needs ("is training worth it at all?").

- zero-shot (``shots: 0``): each eval prompt as the data renders it (chat template or plain, with
  ``data.system_prompt`` and, for classification rows, ``data.instruction`` listing the labels);
- few-shot (``shots: k``, Brown et al., 2020, "Language Models are Few-Shot Learners"): k training rows,
  drawn once with ``training.seed``, shown before every eval prompt as solved examples — earlier user and
  assistant turns with a chat template, ``prompt + answer`` blocks separated by a blank line without one.

Nothing trains and nothing is saved but the tokenizer: ``summary.json`` has ``eval`` (and forgetting, zero
by construction) and no ``train``. It combines with no other strategy.

When to choose it: always, as the first row of a comparison; and as the answer when a few examples in the
prompt already score well enough.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.strategies.base import Phase, Strategy, StrategyConfig, register_strategy


class PromptOnlyConfig(StrategyConfig):
    shots: int = Field(0, ge=0, le=64, description="Training rows shown as solved examples before each prompt.")


@register_strategy
class PromptOnly(Strategy):
    name = "prompt-only"
    summary = (
        "Baseline: the untouched model prompted zero- or few-shot (k training rows as examples); no training."
    )
    Config = PromptOnlyConfig
    phase = Phase.NATIVE
    baseline = True
    trains = False
    saves = False
    mergeable = False

    @classmethod
    def prompt_examples(cls, config) -> int:
        return config.shots

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def own_parameters(self, model):
        return []

    def save(self, model, out_dir) -> None:
        pass

    @classmethod
    def load(cls, base_model, out_dir):
        return base_model

    def describe(self, model) -> str:
        k = self.config.shots
        return f"prompt-only: the untouched model, {f'{k}-shot' if k else 'zero-shot'}; nothing trains"
