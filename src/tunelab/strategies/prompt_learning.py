"""Prompt learning through PEFT: prefix tuning, prompt tuning, P-tuning. Trainable vectors are put in front
of the input; the model's own weights never change.

- ``prefix`` (Li & Liang, 2021, "Prefix-Tuning"): ``num_virtual_tokens`` learned key/value vectors in
  every attention layer. ``projection: true`` reparameterises them through a 2-layer MLP of width
  ``encoder_hidden_size`` during training (the paper's stabiliser). Strongest of the three.
- ``prompt`` (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): learned
  input embeddings only; initialised at random or from the embeddings of ``init_text``. The fewest
  parameters; works best on large models.
- ``ptuning`` (Liu et al., 2021, "GPT Understands, Too"): virtual token embeddings produced by an MLP or
  LSTM prompt encoder.

When to choose them: many tasks served from one frozen model, tiny artefacts, no change to the model's
weights (no forgetting of what the weights hold). They cost sequence length at inference and cannot be
merged into weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from pydantic import Field, model_validator

from tunelab.evaluate import decode_by_forward
from tunelab.strategies.base import PerTaskConfig, Phase, register_strategy
from tunelab.strategies.peft_base import PeftStrategy


class PromptLearning(PeftStrategy):
    declares = replace(PeftStrategy.declares, phase=Phase.PROMPT)  # virtual tokens: nothing to merge
    default_lr = 1e-2

    # PEFT's generate() for virtual-token methods disagrees with its own forward pass with this peft and
    # transformers 5: with the KV cache the virtual tokens are lost after the first new token (the answers
    # read like the base model's; peft issues #1391 and #2123 describe the same kind of failure), and without
    # it prefix tuning's later steps still differ. tunelab therefore decodes these itself (evaluate.new_tokens):
    # the prompt through PEFT's forward, each new token through the model inside with the cache that forward
    # left (3.8x faster than a full forward per token on the default model, and the same tokens).
    # tests/test_strategies.py checks it against a greedy loop of full forwards.
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().apply(model)
        decode_by_forward(model)
        return model

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        model = super().load(base_model, out_dir)
        decode_by_forward(model)
        return model


class PrefixConfig(PerTaskConfig):
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length (virtual tokens per layer).")
    projection: bool = Field(False, description="Reparameterise the prefix through an MLP while training.")
    encoder_hidden_size: int | None = Field(None, gt=0, description="Width of that MLP (default: model width).")


@register_strategy
class Prefix(PromptLearning):
    name = "prefix"
    summary = "Trainable key/value prefixes in every layer (prefix tuning), via PEFT."
    Config = PrefixConfig

    def peft_config(self, model):
        c = self.config
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=c.num_virtual_tokens,
            prefix_projection=c.projection,
            encoder_hidden_size=c.encoder_hidden_size or model.config.hidden_size,
        )


class PromptConfig(PerTaskConfig):
    num_virtual_tokens: int = Field(20, gt=0, description="Number of learned prompt embeddings.")
    init: Literal["random", "text"] = Field("random", description="Initialise at random or from init_text.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt.")

    @model_validator(mode="after")
    def _text_needed(self):
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init: text goes with init_text (and init_text with init: text)")
        return self


@register_strategy
class Prompt(PromptLearning):
    name = "prompt"
    summary = "Trainable soft-prompt embeddings, random or from text (prompt tuning), via PEFT."
    Config = PromptConfig
    default_lr = 3e-2

    def peft_config(self, model):
        c = self.config
        kwargs = {}
        if c.init == "text":
            # PEFT tokenizes init_text with the model's own tokenizer, from the model directory
            kwargs = {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": c.init_text,
                "tokenizer_name_or_path": model.config._name_or_path,
            }
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens, **kwargs)


class PTuningConfig(PerTaskConfig):
    num_virtual_tokens: int = Field(20, gt=0, description="Number of virtual tokens.")
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="Prompt encoder type.")
    encoder_hidden_size: int = Field(128, gt=0, description="Prompt encoder width.")


@register_strategy
class PTuning(PromptLearning):
    name = "ptuning"
    summary = "Virtual tokens from an MLP or LSTM prompt encoder (P-tuning), via PEFT."
    Config = PTuningConfig

    def peft_config(self, model):
        c = self.config
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=c.num_virtual_tokens,
            encoder_reparameterization_type=c.encoder,
            encoder_hidden_size=c.encoder_hidden_size,
        )
