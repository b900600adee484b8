"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network"):
the model being trained (the student) learns to match a frozen teacher's next-token distributions while it
learns the task.

On each training batch, with student logits ``s`` and teacher logits ``t`` at the positions that predict a
label token, temperature ``T`` and the chosen divergence ``D``::

    loss = α · CE(task) + (1 - α) · T² · mean_tokens D(softmax(t / T), softmax(s / T))

(``T²`` keeps the gradient scale independent of ``T``, Hinton et al. §2). Divergences, per token, with
``p`` the teacher's and ``q`` the student's distribution at temperature ``T``:

- ``forward_kl``: KL(p || q) = Σ p (log p - log q) — mass-covering, the classic choice;
- ``reverse_kl``: KL(q || p) — mode-seeking (MiniLLM, Gu et al., 2024);
- ``jsd``: generalised Jensen-Shannon with weight β (Agarwal et al., 2024, "On-Policy Distillation of
  Language Models", GKD): β·KL(p || m) + (1-β)·KL(q || m), m = β·p + (1-β)·q; bounded, symmetric at 0.5.

The student is whatever the run trains: the run's ``model`` under any training strategy. The teacher's
own architecture under LoRA or adapters gives the adapter + distillation hybrid, ``full`` on a smaller
local model gives classic distillation into a smaller model. The teacher (a known model name, a local
model directory, or a tunelab run dir) is loaded frozen, in eval mode, held by this strategy and never by
the model, so it receives no gradient and is never saved with the student. A teacher whose vocabulary or
tokenizer differs from the student's is refused before training: token-level distributions over different
vocabularies cannot be compared.

When to choose it: to move a model's behaviour into a cheaper one (a smaller student, or a small adapter),
or to learn a task while staying close to a strong model's distribution (distilling from the base model is
the retention loss's idea on task data).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.evaluate import autocast
from tunelab.forgetting import divergence, label_positions
from tunelab.strategies.base import Regularizer, StrategyConfig, StrategyError, register_strategy


class DistillConfig(StrategyConfig):
    teacher: str = Field(
        description="The teacher: a known model name (smollm2-135m-instruct), a local model directory, or a "
        "tunelab run dir (its trained model). Must share the student's tokenizer."
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="The divergence D.")
    temperature: float = Field(2.0, gt=0, le=20, description="T: both distributions are softened by it.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the task loss; the distillation term gets 1 - alpha."
    )
    beta: float = Field(0.5, gt=0, lt=1, description="jsd only: the teacher's weight in the mixture m.")


@register_strategy
class Distill(Regularizer):
    name = "distill"
    summary = "Regularizer: distill a frozen teacher's token distributions into the student (KL, reverse KL, JSD)."
    Config = DistillConfig

    def prepare(self, model, ctx) -> None:
        c = self.config
        teacher_tok = ctx.load_tokenizer(c.teacher)
        if teacher_tok.get_vocab() != ctx.tokenizer.get_vocab():
            raise StrategyError(
                f"distill.teacher {c.teacher}: its tokenizer differs from the student's "
                f"({len(teacher_tok)} vs {len(ctx.tokenizer)} tokens); distillation compares token "
                "distributions, so both must use the same tokenizer"
            )
        self.teacher = ctx.load_model(c.teacher)
        t_vocab = self.teacher.get_output_embeddings().weight.shape[0]
        s_vocab = model.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise StrategyError(
                f"distill.teacher {c.teacher}: its output layer has {t_vocab} tokens, the student's {s_vocab}; "
                "both must predict the same vocabulary"
            )
        self.bf16 = ctx.bf16

    def task_loss_weight(self) -> float:
        return self.config.alpha

    def loss_terms(self, model, inputs, outputs):
        c = self.config
        labels = inputs["labels"]
        with torch.no_grad(), autocast(labels.device, self.bf16):
            teacher = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        student = label_positions(outputs.logits, labels)
        d = divergence(student, label_positions(teacher, labels), c.loss, c.temperature, c.beta)
        return {"kd": (1 - c.alpha) * c.temperature**2 * d.mean()}
