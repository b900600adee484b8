"""Layer-wise fine-tuning: choose which base weights train, give lower layers smaller learning rates, and
unfreeze gradually.

**What trains** is the union of

- ``blocks``: transformer blocks by index (``[28, 29]``, ``"20-29"``, negative from the top: ``-1`` is the
  last) or ``top: N`` for the top N blocks; within them the module kinds in ``kinds`` (``attention``,
  ``mlp``, ``norms``), found by asking each block's children (``*Attention``, ``*MLP``, ``*Norm`` classes);
- ``embeddings``, ``head`` and ``final_norm`` switches (a head tied to the embeddings is the same tensor);
- ``patterns``: regular expressions over parameter names, for anything else.

The chosen set is printed before training. Frozen lower blocks cost no backward compute: autograd
stops at the lowest parameter that trains (the benchmark shows the tokens/s gain of the top 4 of 30
blocks over full fine-tuning).

**Layer-wise learning-rate decay** (``lr_decay``, Howard & Ruder, 2018, "ULMFiT", §3.2 "discriminative
fine-tuning"; as used by ELECTRA/BEiT): block ``i`` of ``L`` gets ``lr · lr_decay^(L-1-i)`` — the top block the
base rate, each block below a factor less; embeddings get ``lr · lr_decay^L``, head and final norm ``lr``.

**Gradual unfreezing** (ULMFiT §3.3): with ``unfreeze_every_steps: N`` (or ``unfreeze_every_epoch``)
training starts with only the top ``unfreeze_group`` chosen blocks (plus head and final norm) and adds the
next group down every N steps (or epoch); embeddings and pattern matches join with the last group.

**Chosen from a measurement** (``select: auto``): the blocks (and, with a share as ``budget`` and an
estimator that tells them apart, each block's attention and MLP) that score highest for this task, measured on
the untouched model before training (tunelab.layers: ``grad_norm``, ``fisher`` or ``probe``, the ``by``
option), until ``budget`` is spent: a share of the blocks' parameters (0.25) or a number of blocks (8). The run
writes the measurement to ``RUN/layers.json`` (a resumed run reads it back, so it chooses the same), and
``summary.json`` keeps the scores, the choice and why (``strategies.layerwise``). ``scores: layers.json``
(from ``tunelab layers``) selects from an earlier measurement instead of measuring again.

**LISA** (``sample: γ``, ``every: K``; Pan et al., 2024): every K steps γ blocks drawn at random train, the
embeddings and head always (tunelab.strategies.layer_schedules); ``sample_by: importance`` draws in proportion
to the measured ``by`` score instead of uniformly.

Saved as the trained tensors only (``layerwise.safetensors``), loaded over a fresh base model.

When to choose it: a cheap, strong baseline when the task is close to pretraining (train the top);
lower forgetting than full fine-tuning because the lower layers, which hold general features, stay fixed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file

from tunelab.strategies.anatomy import role
from tunelab.strategies.base import (
    SHARDED,
    Declaration,
    Need,
    Strategy,
    StrategyConfig,
    StrategyError,
    load_named_tensors,
    register_strategy,
    transformer_blocks,
    unwrap,
)
from tunelab.strategies.block_choice import MeasuredChoice, by_hand, ranks
from tunelab.strategies.capabilities import Mergeable, Scheduled, SetUp, ShardingLimits
from tunelab.strategies.layer_schedules import GradualUnfreezing, LayerSampling

WEIGHTS_FILE = "layerwise.safetensors"
KINDS = ("attention", "mlp", "norms")
BY = Literal["grad_norm", "fisher", "probe"]
DEFAULT_BUDGET = 0.25
DEFAULT_EVERY = 20


class LayerwiseConfig(StrategyConfig):
    top: int | None = Field(None, gt=0, description="Train the top N blocks.")
    blocks: list[int | str] | None = Field(
        None, description="Blocks by index or range ('20-29'); negative indices count from the top."
    )
    kinds: list[str] = Field(list(KINDS), description="Module kinds that train inside chosen blocks.")
    embeddings: bool = Field(False, description="Also train the input embeddings.")
    head: bool = Field(False, description="Also train the output head (tied heads share the embeddings).")
    final_norm: bool = Field(False, description="Also train the norm after the last block.")
    patterns: list[str] = Field(default_factory=list, description="Regexes over parameter names to add.")
    lr_decay: float = Field(1.0, gt=0, le=1, description="Per-block learning-rate factor from the top down.")
    unfreeze_every_steps: int | None = Field(None, gt=0, description="Unfreeze one more group every N steps.")
    unfreeze_every_epoch: bool = Field(False, description="Unfreeze one more group at each epoch start.")
    unfreeze_group: int = Field(1, gt=0, description="Blocks per unfreezing group.")
    select: Literal["auto"] | None = Field(
        None,
        description="auto: choose the blocks (and their attention/MLP parts) that a measurement of this task "
        "ranks highest (`by`), to fit `budget`; the scores, the choice and why go to summary.json.",
    )
    budget: float | int | None = Field(
        None,
        description=f"select: auto: a share of the blocks' parameters (0 < share <= 1, e.g. 0.25) or a number "
        f"of blocks (an integer, e.g. 8); default {DEFAULT_BUDGET}.",
    )
    by: BY = Field(
        "grad_norm",
        description="The measurement select: auto (and sample_by: importance) ranks blocks by: grad_norm "
        "(gradient norm relative to weight norm), fisher (EWC's diagonal Fisher) or probe (dev-loss drop when "
        "the block alone trains a few steps; the slowest). See `tunelab layers`.",
    )
    scores: str | None = Field(
        None, description="A layers.json written by `tunelab layers`, to choose from instead of measuring."
    )
    sample: int | None = Field(
        None,
        gt=0,
        description="LISA: this many blocks (gamma) train at a time, drawn anew every `every` steps; the "
        "embeddings and head always train.",
    )
    every: int | None = Field(None, gt=0, description=f"LISA: steps between draws (K); default {DEFAULT_EVERY}.")
    sample_by: Literal["uniform", "importance"] = Field(
        "uniform",
        description="LISA: draw blocks uniformly (the paper), or in proportion to their measured `by` score.",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        bad = sorted(set(v) - set(KINDS))
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; allowed: {', '.join(KINDS)}")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v):
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regex: {e}") from None
        return v

    @field_validator("blocks")
    @classmethod
    def _ranges(cls, v):
        for b in v or []:
            if isinstance(b, str) and not re.fullmatch(r"-?\d+\s*-\s*-?\d+|-?\d+", b.strip()):
                raise ValueError(f"block {b!r}: use an index (3, -1) or a range ('20-29')")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"budget {v}: a share of the blocks' parameters is above 0 and at most 1")
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"budget {v}: give a share (0 < share <= 1) or a number of blocks (1 or more)")
        return v

    @model_validator(mode="after")
    def _one_selection(self):
        if self.top is not None and self.blocks is not None:
            raise ValueError("give either top or blocks, not both")
        # every check asks the value, not whether it was written: a run's resolved config.yaml has every key
        if self.select and (self.top is not None or self.blocks is not None):
            raise ValueError("select: auto chooses the blocks itself; give select or top/blocks, not both")
        if self.sample is not None and (self.select or self.top is not None or self.blocks is not None):
            raise ValueError("sample (LISA) draws from every block; it takes no select, top or blocks")
        if self.unfreeze_every_steps and self.unfreeze_every_epoch:
            raise ValueError("give either unfreeze_every_steps or unfreeze_every_epoch, not both")
        if self.sample is not None and (self.unfreeze_every_steps or self.unfreeze_every_epoch):
            raise ValueError("sample (LISA) and gradual unfreezing both decide what trains when; choose one")
        if self.budget is not None and not self.select:
            raise ValueError("budget is select: auto's; add select: auto or drop budget")
        if self.every is not None and self.sample is None:
            raise ValueError("every is LISA's draw period; add sample: N (blocks at a time) or drop every")
        if self.sample_by != "uniform" and self.sample is None:
            raise ValueError("sample_by is LISA's; add sample: N (blocks at a time) or drop sample_by")
        if not ranks(self):
            if self.by != "grad_norm":
                raise ValueError("by ranks blocks for select: auto or sample_by: importance; add one or drop by")
            if self.scores is not None:
                raise ValueError("scores is read by select: auto or sample_by: importance; add one or drop scores")
        if self.select or self.sample is not None:
            return self
        nothing = (
            self.top is None
            and not self.blocks
            and not (self.embeddings or self.head or self.final_norm or self.patterns)
        )
        if nothing:
            raise ValueError("choose what trains: top, blocks, embeddings, head, final_norm or patterns")
        return self


class Layerwise(MeasuredChoice, Strategy, Scheduled, Mergeable, ShardingLimits, SetUp):
    name = "layerwise"
    summary = "Chosen blocks train (by hand, measured: select auto, or LISA), with LR decay and unfreezing."
    Config = LayerwiseConfig
    default_lr = 5e-5
    declares = Declaration(changes_base_weights=True)  # merging: its weights are the model's own already

    @classmethod
    def declare(cls, config) -> Declaration:
        if ranks(config) and config.scores is None:
            return replace(cls.declares, needs=frozenset({Need.LAYER_SCORES}))
        return cls.declares

    @classmethod
    def distributed_problem(cls, config, mode):
        unfreezes = config.unfreeze_every_steps is not None or config.unfreeze_every_epoch
        if unfreezes and mode in SHARDED:
            # measured under FSDP2: the losses part from one process's at the first unfreezing
            return (
                "gradual unfreezing turns weights trainable while training, and the sharding engine keeps to the "
                "weights that trained at its first step (use ddp)"
            )
        if config.sample is not None and mode in SHARDED:
            return (
                "LISA turns blocks trainable while training, which the sharding engine does not follow (use ddp)"
            )
        if ranks(config) and config.scores is None:
            return (
                "each process would measure the blocks on its own and might choose differently; measure once with "
                "`tunelab layers CONFIG` and give its layers.json as scores"
            )
        return None

    @property
    def draw_every(self) -> int:
        """LISA's period K."""
        return self.config.every or DEFAULT_EVERY

    # -- the model ----------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = unwrap(model)
        blocks = transformer_blocks(inner)
        self.n_blocks = len(blocks)
        self.selection = None
        if self.config.select:
            from tunelab.strategies.block_choice import select

            budget = self.config.budget if self.config.budget is not None else DEFAULT_BUDGET
            try:
                self.selection = select(self._measurement(), self.config.by, budget, self.config.kinds)
            except ValueError as e:
                raise StrategyError(str(e)) from None
            kinds_of = self.selection.parts
        else:
            kinds_of = {i: self.config.kinds for i in by_hand(self.config, len(blocks))}
        self.sampling_weights()  # LISA by importance: a missing or mismatched measurement fails now
        # groups: (lr exponent, parameters, label); block i has exponent L-1-i
        self.block_params: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        names = {id(p): n for n, p in inner.named_parameters()}
        for i, kinds in sorted(kinds_of.items()):
            params = []
            for child in blocks[i].children():
                if role(child) in kinds:
                    params += [(names[id(p)], p) for p in child.parameters() if id(p) in names]
            self.block_params[i] = params
        chosen = sorted(self.block_params)
        lisa = self.config.sample is not None  # LISA: embeddings and head always train
        extra: list[tuple[str, torch.nn.Parameter]] = []
        if self.config.embeddings or lisa:
            extra.append((names[id(inner.get_input_embeddings().weight)], inner.get_input_embeddings().weight))
        self.top_extra: list[tuple[str, torch.nn.Parameter]] = []
        head = inner.get_output_embeddings()
        if (self.config.head or lisa) and head is not None:
            self.top_extra += [(names[id(p)], p) for p in head.parameters() if id(p) in names]
        if self.config.final_norm:
            norm = self._final_norm(inner, blocks)
            self.top_extra += [(names[id(p)], p) for p in norm.parameters()]
        for pattern in self.config.patterns:
            rx = re.compile(pattern)
            matched = [(n, p) for n, p in inner.named_parameters() if rx.search(n)]
            if not matched:
                raise StrategyError(f"layerwise: pattern {pattern!r} matches no parameter")
            extra += matched
        self.extra = extra
        self._own = self._dedupe([*self.top_extra, *[x for i in chosen for x in self.block_params[i]], *extra])
        if not self._own:
            raise StrategyError("layerwise: the chosen blocks/kinds select no parameter")
        return model

    @staticmethod
    def _dedupe(items):
        seen, out = set(), []
        for n, p in items:
            if id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
        return out

    @staticmethod
    def _final_norm(inner, blocks):
        last = blocks[-1]
        norms = [m for m in inner.modules() if role(m) == "norms" and all(m is not x for x in last.modules())]
        if not norms:
            raise StrategyError("layerwise: final_norm requested but the model has no norm outside its blocks")
        return norms[-1]

    def own_parameters(self, model):
        return list(self._own)

    def describe(self, model) -> str:
        chosen = sorted(self.block_params)
        lisa = self.config.sample is not None
        if self.selection is not None:
            split = [f"{i} ({'+'.join(k for k in self.selection.parts[i] if k != 'norms')})" for i in chosen]
            blocks = f"blocks {', '.join(split)} of {self.n_blocks}, chosen by {self.config.by}"
        elif lisa:
            blocks = (
                f"{self.config.sample} of {self.n_blocks} blocks at a time, drawn "
                f"{'by ' + self.config.by if self.config.sample_by == 'importance' else 'uniformly'} "
                f"every {self.draw_every} steps (LISA)"
            )
        else:
            blocks = f"blocks {_ranges(chosen)} of {self.n_blocks} ({', '.join(self.config.kinds)})"
        parts = [
            blocks if chosen else None,
            "embeddings" if self.config.embeddings or lisa else None,
            "head" if self.config.head or lisa else None,
            "final norm" if self.config.final_norm else None,
            f"patterns {self.config.patterns}" if self.config.patterns else None,
        ]
        n = sum(p.numel() for _, p in self._own)
        if lisa:  # what trains at a time: the drawn blocks (as large as each other) and the rest
            per_block = max(sum(p.numel() for _, p in ps) for ps in self.block_params.values())
            in_blocks = sum(p.numel() for ps in self.block_params.values() for _, p in ps)
            n = n - in_blocks + self.config.sample * per_block
        line = f"layerwise trains {', '.join(x for x in parts if x)}: {n:,} parameters"
        if lisa:
            line += " at a time"
        if self.config.lr_decay < 1:
            line += f"; lr decay {self.config.lr_decay} per block from the top"
        if self._unfreezing():
            line += f"; gradual unfreezing, {self.config.unfreeze_group} block(s) per stage"
        return line

    def param_groups(self, model, lr):
        base, decay, top = lr, self.config.lr_decay, self.n_blocks - 1
        groups = [{"params": [p for _, p in self.top_extra], "lr": base, "name": "layerwise/top"}]
        seen = {id(p) for _, p in self.top_extra}
        for i in sorted(self.block_params, reverse=True):
            params = [p for _, p in self.block_params[i] if id(p) not in seen]
            seen |= {id(p) for p in params}
            groups.append({"params": params, "lr": base * decay ** (top - i), "name": f"layerwise/block{i}"})
        params = [p for _, p in self.extra if id(p) not in seen]
        groups.append({"params": params, "lr": base * decay**self.n_blocks, "name": "layerwise/embeddings"})
        return [g for g in groups if g["params"]]

    # -- gradual unfreezing -----------------------------------------------------------------------
    def _unfreezing(self) -> bool:
        return bool(self.config.unfreeze_every_steps or self.config.unfreeze_every_epoch)

    def stages(self) -> list[list[torch.nn.Parameter]]:
        """Parameters unfrozen at each stage, top group first; extras join the last stage."""
        chosen = sorted(self.block_params, reverse=True)
        g = self.config.unfreeze_group
        stages = [
            [p for i in chosen[k : k + g] for _, p in self.block_params[i]] for k in range(0, len(chosen), g)
        ]
        stages = stages or [[]]
        stages[0] = [p for _, p in self.top_extra] + stages[0]
        stages[-1] += [p for _, p in self.extra]
        return stages

    def callbacks(self):
        if self.config.sample is not None:
            return [LayerSampling(self, self.seed)]
        return [GradualUnfreezing(self)] if self._unfreezing() else []

    def prepare(self, model, ctx) -> None:
        self.seed = ctx.seed  # LISA's draws are a function of training.seed and the period

    # -- artefact ---------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in self._own}, out_dir / WEIGHTS_FILE)

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        load_named_tensors(base_model, out_dir / WEIGHTS_FILE)
        return base_model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # its weights are already the model's own


register_strategy(Layerwise)


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)
