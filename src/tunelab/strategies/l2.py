"""L2 weight decay, decoupled (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization").

Before each optimizer step every trained parameter shrinks towards zero, ``θ ← θ · (1 − lr_g · weight)``,
with ``lr_g`` the current learning rate of its optimizer group — the AdamW form, applied here to every
trained parameter (norms and biases too, unlike ``training.weight_decay``) and combinable with any
strategy. Pulls towards zero, not towards the pretrained weights: for that, use ``l2sp``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from transformers import TrainerCallback

from tunelab.strategies.base import Regularizer, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import Scheduled, ShardingLimits


class L2Config(StrategyConfig):
    weight: float = Field(0.01, gt=0, description="Decay per step, multiplied by the group's learning rate.")


class _Decay(TrainerCallback):
    def __init__(self, weight: float):
        self.weight = weight

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * self.weight)


@register_strategy
class L2(Regularizer, Scheduled, ShardingLimits):
    name = "l2"
    summary = "Regularizer: decoupled L2 weight decay on the trained parameters."
    Config = L2Config

    @classmethod
    def distributed_problem(cls, config, mode):
        if mode == "deepspeed":
            return (
                "it decays the weights the optimizer's groups hold, which DeepSpeed replaces with flat partitions "
                "(use fsdp or ddp)"
            )
        return None

    def callbacks(self):
        return [_Decay(self.config.weight)]
