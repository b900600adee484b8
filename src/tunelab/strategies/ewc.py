"""Elastic Weight Consolidation (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural
networks", eq. 3), with the online variant for sequences (Schwarz et al., 2018, "Progress & Compress", §3).

    penalty = λ / 2 · Σ_i F_i (θ_i − θ*_i)²

``F`` is the diagonal Fisher information of the trained parameters, estimated before training on the
retention set (the base model's own answers; the default, which protects what the base model does) or on a
user file, from ``samples`` examples one at a time::

    F_i = mean over examples of (∂/∂θ_i Σ_t log p(y_t | x, y_<t))²

``fisher: empirical`` uses the reference tokens as ``y``; ``fisher: sampled`` draws each ``y_t`` from the
model's own predictive distribution at that position (teacher-forced on the reference prefix), the true
Fisher's expectation. ``θ*`` are the parameters' values when the Fisher is estimated.

Continual learning: at the end of each task the Fisher is re-estimated on that task's training rows and
accumulated, ``F ← γ F + F_new``, with the anchor moved to the current weights (online EWC; ``gamma: 1`` keeps
the plain sum). Fisher and anchors exist only for trained parameters.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.data import IGNORE, Collator
from tunelab.evaluate import autocast
from tunelab.strategies.base import Declaration, Need, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import LossTerm, SetUp
from tunelab.strategies.l2sp import Anchored


class EWCConfig(StrategyConfig):
    lam: float = Field(100.0, gt=0, description="λ, the penalty weight.")
    fisher: Literal["empirical", "sampled"] = Field("empirical", description="Targets for the Fisher estimate.")
    data: str = Field("retention", description="'retention' (the base model's answers) or a data file path.")
    samples: int = Field(64, gt=0, description="Examples used to estimate the Fisher.")
    gamma: float = Field(1.0, gt=0, le=1, description="Online EWC decay of the old Fisher at each new task.")


def estimate_fisher(
    model,
    params: list[torch.Tensor],
    features: list[dict],
    pad_id: int,
    mode: str,
    seed: int = 0,
    bf16: bool = False,
) -> list[torch.Tensor]:
    """Diagonal Fisher of ``params`` over ``features`` (tokenized rows with labels), one example at a time, in
    the run's precision (``bf16``: under autocast, as training runs)."""
    device = params[0].device
    fisher = [torch.zeros_like(p) for p in params]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    collate = Collator(pad_id)
    was = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    try:
        for feat in features:
            batch = {k: v.to(device) for k, v in collate([feat]).items()}
            with autocast(device, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            n = batch["labels"].shape[1]
            logp = F.log_softmax(logits[:, -n:][:, :-1].float(), -1)
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE
            if mode == "sampled":
                probs = logp[mask].exp().detach().cpu()
                targets = targets.clone()
                targets[mask] = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(device)
            ll = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum()
            grads = torch.autograd.grad(ll, params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f += g.detach() ** 2
    finally:
        model.train(was)
    return [f / max(len(features), 1) for f in fisher]


def ewc_penalty(params, anchors, fisher, lam: float) -> torch.Tensor:
    return 0.5 * lam * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher, strict=True))


@register_strategy
class EWC(Anchored, LossTerm, SetUp):
    name = "ewc"
    summary = "Regularizer: EWC, a Fisher-weighted pull towards the starting values (online with gamma)."
    Config = EWCConfig

    @classmethod
    def declare(cls, config) -> Declaration:
        needs = frozenset({Need.RETENTION}) if config.data == "retention" else frozenset()
        return replace(cls.declares, needs=needs)

    def _features(self, ctx) -> list[dict]:
        feats = ctx.retention.features if self.config.data == "retention" else ctx.load_rows(self.config.data)
        return feats[: self.config.samples]

    def prepare(self, model, ctx) -> None:
        self.params = [p for _, p in self.trained(model)]
        self.fisher = estimate_fisher(
            model,
            self.params,
            self._features(ctx),
            ctx.tokenizer.pad_token_id,
            self.config.fisher,
            ctx.seed,
            ctx.bf16,
        )
        self.anchors = [p.detach().clone() for p in self.params]

    def on_task_end(self, model, ctx) -> None:
        new = estimate_fisher(
            model,
            self.params,
            ctx.task_features[: self.config.samples],
            ctx.tokenizer.pad_token_id,
            self.config.fisher,
            ctx.seed,
            ctx.bf16,
        )
        self.fisher = [self.config.gamma * f + n for f, n in zip(self.fisher, new, strict=True)]
        self.anchors = [p.detach().clone() for p in self.params]

    def loss_terms(self, model, inputs, outputs):
        return {"penalty": ewc_penalty(self.params, self.anchors, self.fisher, self.config.lam)}
