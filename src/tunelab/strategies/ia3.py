"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", the (IA)^3 method), through PEFT.

Learned vectors rescale the keys, the values and the feed-forward activations elementwise:
``k' = l_k * k``, ``v' = l_v * v``, ``h' = l_ff * h``. The vectors start at ones (the base model at step 0)
and are the only trainable parameters: tens of thousands for a 135M model, far fewer than LoRA.

When to choose it: the smallest adapters, for many tasks per base model or very little data; usually
below LoRA on harder tasks. Mergeable (the scales fold into the weights).
"""

from __future__ import annotations

from peft import IA3Config as PeftIA3Config
from pydantic import Field

from tunelab.strategies.base import PerTaskConfig, register_strategy
from tunelab.strategies.peft_base import PeftMerge, PeftStrategy


class IA3Config(PerTaskConfig):
    target_modules: list[str] | str | None = Field(
        None, description="Modules to rescale; default: PEFT's per-architecture choice (keys, values, MLP)."
    )
    feedforward_modules: list[str] | str | None = Field(
        None, description="Which of target_modules are feed-forward (scaled on their input, not output)."
    )


@register_strategy
class IA3(PeftStrategy, PeftMerge):
    name = "ia3"
    summary = "Learned scales on keys, values and MLP activations (IA3), via PEFT; mergeable."
    Config = IA3Config
    default_lr = 3e-3

    def peft_config(self, model) -> PeftIA3Config:
        return PeftIA3Config(
            task_type="CAUSAL_LM",
            target_modules=self.config.target_modules,
            feedforward_modules=self.config.feedforward_modules,
        )
