"""Knowledge-retention loss (Learning without Forgetting, Li & Hoiem, 2017, §3): keep the tuned model's
next-token distributions close to the frozen base model's on general prompts while it learns the task.

Every ``every`` steps a retention batch (the base model's own answers to the retention prompts) is
interleaved with the task batch, and

    term = λ · KL(p_base || p_tuned)        (token-level, teacher-forced, on the answer tokens)

is added to the loss. ``p_base`` comes from the model with its added modules disabled when the strategies
allow it (LoRA, adapters, prefix ...), else from a frozen copy of the base model; either way without
gradients.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from tunelab.evaluate import autocast
from tunelab.forgetting import token_kl
from tunelab.strategies.base import Need, Regularizer, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import LossTerm, SetUp


class RetentionConfig(StrategyConfig):
    lam: float = Field(1.0, gt=0, description="λ, the weight of the KL term.")
    batch_size: int = Field(4, gt=0, description="Retention rows per interleaved batch.")
    every: int = Field(1, gt=0, description="Add the term every N steps.")


@register_strategy
class Retention(Regularizer, LossTerm, SetUp):
    name = "retention"
    summary = "Regularizer: KL to the base model on interleaved retention batches (LwF)."
    Config = RetentionConfig

    declares = replace(Regularizer.declares, needs=frozenset({Need.RETENTION, Need.BASE_OUTPUTS}))

    def prepare(self, model, ctx) -> None:
        self.ctx = ctx
        self.batches = ctx.retention_batches(self.config.batch_size)
        self.calls = 0

    def loss_terms(self, model, inputs, outputs):
        self.calls += 1
        if (self.calls - 1) % self.config.every:
            return {}
        batch = self.batches[(self.calls - 1) // self.config.every % len(self.batches)]
        with autocast(batch["input_ids"].device, self.ctx.bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = self.ctx.reference.logits(batch["input_ids"], batch["attention_mask"], self.ctx.bf16)
        kl, n = token_kl(base, logits, batch["labels"])
        return {"kl": self.config.lam * kl / max(n, 1)}
