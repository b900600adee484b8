"""L2-SP (Li, Grandvalet & Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks", §3): pull the trained weights towards their starting point.

    penalty = alpha / 2 · Σ_i ||θ_i − θ_i^0||²

over the trained parameters, with ``θ^0`` their values when training starts: the pretrained weights for
base parameters (full, layer-wise), the initialisation for new ones (LoRA, adapters). Anchors are kept
only for trained parameters, so memory is one copy of what trains.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.strategies.base import SHARDED, Regularizer, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import LossTerm, SetUp, ShardingLimits


class L2SPConfig(StrategyConfig):
    alpha: float = Field(0.01, gt=0, description="Penalty weight.")


def l2sp_penalty(params: list[torch.Tensor], anchors: list[torch.Tensor], alpha: float) -> torch.Tensor:
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    return 0.5 * alpha * total


class Anchored(Regularizer, ShardingLimits):
    """A regularizer that pulls the trained weights towards their values before training (L2-SP, EWC)."""

    @classmethod
    def distributed_problem(cls, config, mode):
        if mode in SHARDED:
            # measured under FSDP2 (ewc): the penalty stays 0.0 at every step; in one process it is ~4,000
            return (
                "it holds the trained weights and their starting values, whole, from before training; sharding "
                "replaces the weights with shards (use ddp)"
            )
        return None


@register_strategy
class L2SP(Anchored, LossTerm, SetUp):
    name = "l2sp"
    summary = "Regularizer: L2-SP, a pull of the trained parameters towards their starting values."
    Config = L2SPConfig

    def prepare(self, model, ctx) -> None:
        self.params = [p for _, p in self.trained(model)]
        self.anchors = [p.detach().clone() for p in self.params]

    def loss_terms(self, model, inputs, outputs):
        return {"penalty": l2sp_penalty(self.params, self.anchors, self.config.alpha)}
