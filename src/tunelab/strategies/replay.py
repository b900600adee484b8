"""Replay (rehearsal; Robins, 1995; Rolnick et al., 2019, "Experience Replay for Continual Learning"): mix
earlier examples into the training data so that batches keep exercising old behaviour.

``share`` of the final training rows are replayed examples, drawn (seeded) from the retention set — the
base model's own answers, i.e. self-distillation on general prompts — and, in continual learning, from the
training rows of earlier tasks.
"""

from __future__ import annotations

import random
from dataclasses import replace

from pydantic import Field

from tunelab.strategies.base import Declaration, Need, Regularizer, StrategyConfig, register_strategy
from tunelab.strategies.capabilities import DataHook


class ReplayConfig(StrategyConfig):
    share: float = Field(0.2, gt=0, lt=1, description="Fraction of training rows that are replayed examples.")
    retention: bool = Field(True, description="Replay the retention set (base answers).")
    previous_tasks: bool = Field(True, description="Continual learning: replay earlier tasks' rows.")


@register_strategy
class Replay(Regularizer, DataHook):
    name = "replay"
    summary = "Regularizer: a share of retention-set or earlier-task rows mixed into training."
    Config = ReplayConfig

    @classmethod
    def declare(cls, config) -> Declaration:
        return replace(cls.declares, needs=frozenset({Need.RETENTION}) if config.retention else frozenset())

    @classmethod
    def check(cls, config, stack) -> None:
        if not config.retention and stack.mode not in (None, "continual"):
            raise ValueError(
                f"replay.retention: false leaves only earlier tasks' rows to replay, which only mode: continual "
                f"has (this run's mode is {stack.mode}), so replay would add nothing; replay the retention set "
                "or remove replay"
            )

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
