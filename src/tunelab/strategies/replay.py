"""Replay (rehearsal; Robins, 1995; Rolnick et al., 2019, "Experience Replay for Continual Learning"): mix
earlier examples into the training data so that batches keep exercising old behaviour.

``share`` of the final training rows are replayed examples, drawn (seeded) from the retention set — the
base model's own answers, i.e. self-distillation on general prompts — and, in continual learning, from the
training rows of earlier tasks.
"""

from __future__ import annotations

import random

from pydantic import Field

from tunelab.strategies.base import Need, Regularizer, StrategyConfig, register_strategy


class ReplayConfig(StrategyConfig):
    share: float = Field(0.2, gt=0, lt=1, description="Fraction of training rows that are replayed examples.")
    retention: bool = Field(True, description="Replay the retention set (base answers).")
    previous_tasks: bool = Field(True, description="Continual learning: replay earlier tasks' rows.")


@register_strategy
class Replay(Regularizer):
    name = "replay"
    summary = "Regularizer: a share of retention-set or earlier-task rows mixed into training."
    Config = ReplayConfig

    @classmethod
    def needs(cls, config):
        return frozenset({Need.RETENTION}) if config.retention else frozenset()

    def training_features(self, features, ctx):
        pool = []
        if self.config.retention and ctx.retention is not None:
            pool += ctx.retention.features
        if self.config.previous_tasks:
            pool += ctx.previous_features
        if not pool:
            return features
        k = round(len(features) * self.config.share / (1 - self.config.share))
        rng = random.Random(ctx.seed)
        return features + [pool[rng.randrange(len(pool))] for _ in range(k)]
