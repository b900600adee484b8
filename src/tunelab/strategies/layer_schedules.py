"""Layer-wise schedules that change what trains while training runs (Trainer callbacks of
:mod:`tunelab.strategies.layerwise`): gradual unfreezing (ULMFiT §3.3) and LISA's layer sampling.

**LISA** (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning", Algorithm 1): every ``every`` (K) steps, ``sample`` (γ) blocks are drawn and only they train,
with the embeddings and the head always on. At each draw the blocks' AdamW moments are dropped (the
algorithm runs a fresh AdamW over each period) and the blocks that leave lose their gradients, so the
optimizer holds state for γ blocks, not for every block that ever trained.

The draw for period ``p`` is a pure function of ``(training.seed, p)`` (and of the measured scores when
``sample_by: importance``), so there is no sampler state to lose: a run resumed after kill -9 draws exactly
what the uninterrupted run drew, and the optimizer's state for the period comes back from the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback


class GradualUnfreezing(TrainerCallback):
    """Freezes all but the first stage at train start, then unfreezes the next stage on schedule.

    The optimizer holds every stage's parameters from the start; a frozen parameter gets no gradient,
    and AdamW skips parameters without one, so a stage starts from fresh moments when it joins.
    """

    def __init__(self, strategy: Any):  # the layer-wise strategy (its stages())
        self.s = strategy
        self.stage = 0

    def _set(self, stage: int) -> None:
        self.stage = stage
        for k, params in enumerate(self.s.stages()):
            for p in params:
                p.requires_grad_(k <= stage)

    def _due(self, state) -> int:
        c = self.s.config
        if c.unfreeze_every_steps:
            return state.global_step // c.unfreeze_every_steps
        return int(state.epoch or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(min(self._due(state), len(self.s.stages()) - 1))

    def on_step_begin(self, args, state, control, **kwargs):
        due = min(self._due(state), len(self.s.stages()) - 1)
        if due != self.stage:
            self._set(due)


def draw(n_blocks: int, gamma: int, seed: int, period: int, weights: list[float] | None = None) -> list[int]:
    """The γ blocks that train in ``period``: uniform without replacement, or in proportion to ``weights``
    (negative scores count as none, and every block keeps a small chance)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + period)
    if weights is None:
        return sorted(torch.randperm(n_blocks, generator=g)[:gamma].tolist())
    w = torch.tensor([max(float(x), 0.0) for x in weights], dtype=torch.float64)
    w = w + (w.max() * 0.01 if w.max() > 0 else 1.0)
    return sorted(torch.multinomial(w, gamma, replacement=False, generator=g).tolist())


class LayerSampling(TrainerCallback):
    """LISA: the blocks of the current period train, the others are frozen with no gradient and no
    optimizer state (see the module docstring)."""

    def __init__(self, strategy: Any, seed: int):  # the layer-wise strategy (its drawn blocks' parameters)
        self.s, self.seed = strategy, seed

    def _period(self, step: int) -> int:
        return step // self.s.draw_every

    def _set(self, period: int) -> None:
        c = self.s.config
        active = draw(self.s.n_blocks, c.sample, self.seed, period, self.s.sampling_weights())
        for i, params in self.s.block_params.items():
            on = i in active
            for _, p in params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(self._period(state.global_step))  # a resumed run: its period, moments from the checkpoint

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step % self.s.draw_every:
            return
        self._set(self._period(state.global_step))
        if optimizer is not None:  # a fresh AdamW over the period's blocks (Algorithm 1)
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            for params in self.s.block_params.values():
                for _, p in params:
                    inner.state.pop(p, None)
