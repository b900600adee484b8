"""Prompt-engineering baselines: the untouched model, prompted, scored with the same metrics as a trained
run — the row every comparison needs ("is training worth it at all?").

- zero-shot (``shots: 0``): each eval prompt as the data renders it (chat template or plain, with
  ``data.system_prompt`` and, for classification rows, ``data.instruction`` listing the labels);
- few-shot (``shots: k``, Brown et al., 2020, "Language Models are Few-Shot Learners"): k training rows,
  drawn once with ``training.seed`` (``select: random``) or the k nearest to each prompt by BM25
  (``select: bm25``), shown before every eval prompt as solved examples — earlier user and assistant turns
  with a chat template, ``prompt + answer`` blocks separated by a blank line without one;
- ``system_prompt``: the instruction the model is prompted with (a chat template's system turn), in place of
  ``data.system_prompt``. A comparison's search can choose shots, selection and instruction on the dev split.

Nothing trains and nothing is saved but the tokenizer: ``summary.json`` has ``eval`` (and forgetting, zero
by construction) and no ``train``. It combines with no other strategy.

When to choose it: always, as the first row of a comparison; and as the answer when a few examples in the
prompt already score well enough.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.data import Shots
from tunelab.strategies.base import Declaration, Strategy, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import Baseline


class PromptOnlyConfig(StrategyConfig):
    shots: int = Field(0, ge=0, le=64, description="Training rows shown as solved examples before each prompt.")
    select: Literal["random", "bm25"] = Field(
        "random",
        description="Which training rows are shown: random (one draw with training.seed, the same for every "
        "prompt) or bm25 (the rows whose prompts are nearest to each prompt, by BM25).",
    )
    system_prompt: str | None = Field(
        None,
        description="The instruction (system prompt) the model is prompted with, in place of data.system_prompt.",
    )


@register_strategy
class PromptOnly(Strategy, Baseline):
    name = "prompt-only"
    summary = (
        "Baseline: the untouched model prompted zero- or few-shot (k training rows as examples); no training."
    )
    Config = PromptOnlyConfig
    declares = Declaration(trains=False, saves=False)

    @classmethod
    def prompt_examples(cls, config) -> Shots:
        return Shots(config.shots, config.select, config.system_prompt)

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
        k, c = self.config.shots, self.config
        shown = f"{k}-shot ({c.select} examples)" if k else "zero-shot"
        told = ", its own system prompt" if c.system_prompt is not None else ""
        return f"prompt-only: the untouched model, {shown}{told}; nothing trains"
