"""A student cut from its teacher, DistilBERT-style (Sanh et al., 2019, §3: "initialise the student from the
teacher by taking one layer out of two"): ``keep_every: k`` keeps blocks 0, k, 2k, ... of the run's
``model``, ``keep_layers: [...]`` a chosen list; the embeddings, final norm and head are the teacher's.

A structure strategy: it changes the architecture before anything else applies, trains nothing itself and
saves nothing itself. The cut model is new, so it trains with ``full`` and is saved whole (an adapter or
layer-wise weights would need a base model that exists nowhere). Combine it with ``distill`` to learn from
the uncut model: ``[full, {name: student, keep_every: 2}, {name: distill, hidden_weight: 1.0}]``. Each kept
block remembers which teacher block it was (``teacher_block``), which distillation's hidden-state alignment
asks of the model.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from tunelab.strategies.base import (
    Declaration,
    Phase,
    Strategy,
    StrategyConfig,
    StrategyError,
    register_strategy,
    transformer_blocks,
    unwrap,
)

#: the attribute each kept block carries: the index of the teacher block it was copied from
TEACHER_BLOCK = "tunelab_teacher_block"


class StudentConfig(StrategyConfig):
    keep_every: int | None = Field(
        None, ge=2, description="Student = the run's model with blocks 0, k, 2k, ... kept (train it with full)."
    )
    keep_layers: list[int] | None = Field(
        None, min_length=1, description="Student = the run's model with these blocks kept (0-based, in order)."
    )

    @model_validator(mode="after")
    def _one_cut(self):
        if (self.keep_every is None) == (self.keep_layers is None):
            raise ValueError("give keep_every or keep_layers (one of them, not both)")
        if self.keep_layers is not None and (
            sorted(set(self.keep_layers)) != self.keep_layers or min(self.keep_layers) < 0
        ):
            raise ValueError(
                f"keep_layers must be distinct block indices >= 0 in increasing order, got {self.keep_layers}"
            )
        return self


def cut_blocks(model: torch.nn.Module, keep: list[int]) -> None:
    """Keep only blocks ``keep`` of ``model``, in place: the block list, the layer count in the config (and
    its per-layer lists), and each kept block's layer index (its slot in the KV cache)."""
    inner = unwrap(model)
    n = len(transformer_blocks(inner))
    if not keep or max(keep) >= n:
        raise StrategyError(f"student: the model has {n} blocks (0..{n - 1}); cannot keep {keep}")
    holder, attr = next(
        (parent, name)
        for parent in inner.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) == n
    )
    blocks = getattr(holder, attr)
    for i in keep:
        setattr(blocks[i], TEACHER_BLOCK, i)
    setattr(holder, attr, torch.nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(getattr(holder, attr)):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    inner.config.num_hidden_layers = len(keep)
    for key in ("layer_types",):  # per-layer lists in the config follow the kept blocks
        values = getattr(inner.config, key, None)
        if isinstance(values, list) and len(values) == n:
            setattr(inner.config, key, [values[i] for i in keep])


def teacher_block(block: torch.nn.Module) -> int | None:
    """The teacher block ``block`` was copied from, if a student cut made it."""
    return getattr(block, TEACHER_BLOCK, None)


@register_strategy
class Student(Strategy):
    name = "student"
    summary = "Structure: a smaller student cut from the model (every k-th block, or chosen ones); train it full."
    Config = StudentConfig
    declares = Declaration(phase=Phase.STRUCTURE, trains=False, saves=False, changes_base_weights=True)

    @classmethod
    def check(cls, config, stack) -> None:
        if not stack.saves_whole_model:
            raise ValueError(
                "student.keep_every / keep_layers cut blocks out of the model: the student is a new, smaller "
                "model, saved whole; train it with `full` (an adapter or layer-wise weights would need a base "
                "model that exists nowhere)"
            )

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        c = self.config
        n = len(transformer_blocks(unwrap(model)))
        self.n = n
        self.kept = list(range(0, n, c.keep_every)) if c.keep_every else list(c.keep_layers)
        cut_blocks(model, self.kept)
        return model

    def own_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return []  # the training strategy (full) trains the cut model

    def describe(self, model: torch.nn.Module) -> str:
        return f"student: keeps blocks {self.kept} ({len(self.kept)} of {self.n}) of its teacher"

    def save(self, model: torch.nn.Module, out_dir) -> None:
        pass  # full saves the cut model whole

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir) -> torch.nn.Module:
        return base_model
