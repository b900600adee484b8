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

Saved as the trained tensors only (``layerwise.safetensors``), loaded over a fresh base model.

When to choose it: a cheap, strong baseline when the task is close to pretraining (train the top);
lower forgetting than full fine-tuning because the lower layers, which hold general features, stay fixed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from transformers import TrainerCallback

from tunelab.strategies.anatomy import role
from tunelab.strategies.base import (
    SHARDED,
    Declaration,
    Strategy,
    StrategyConfig,
    StrategyError,
    load_named_tensors,
    register_strategy,
    transformer_blocks,
    unwrap,
)
from tunelab.strategies.capabilities import Mergeable, Scheduled, ShardingLimits

WEIGHTS_FILE = "layerwise.safetensors"
KINDS = ("attention", "mlp", "norms")


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

    @model_validator(mode="after")
    def _one_selection(self):
        if self.top is not None and self.blocks is not None:
            raise ValueError("give either top or blocks, not both")
        if self.unfreeze_every_steps and self.unfreeze_every_epoch:
            raise ValueError("give either unfreeze_every_steps or unfreeze_every_epoch, not both")
        nothing = (
            self.top is None
            and not self.blocks
            and not (self.embeddings or self.head or self.final_norm or self.patterns)
        )
        if nothing:
            raise ValueError("choose what trains: top, blocks, embeddings, head, final_norm or patterns")
        return self


def _block_indices(cfg: LayerwiseConfig, n: int) -> list[int]:
    if cfg.top is not None:
        if cfg.top > n:
            raise StrategyError(f"layerwise: top={cfg.top} but the model has {n} blocks")
        return list(range(n - cfg.top, n))
    chosen: set[int] = set()
    for b in cfg.blocks or []:
        if isinstance(b, int) or re.fullmatch(r"-?\d+", str(b).strip()):
            lo = hi = int(b)
        else:
            lo, hi = (int(x) for x in re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", b.strip()).groups())
        for i in range(lo, hi + 1):
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise StrategyError(f"layerwise: block {i} is out of range; the model has blocks 0-{n - 1}")
            chosen.add(j)
    return sorted(chosen)


class Layerwise(Strategy, Scheduled, Mergeable, ShardingLimits):
    name = "layerwise"
    summary = "Chosen blocks and kinds of base weights train, with per-block LR decay and gradual unfreezing."
    Config = LayerwiseConfig
    default_lr = 5e-5
    declares = Declaration(changes_base_weights=True)  # merging: its weights are the model's own already

    @classmethod
    def distributed_problem(cls, config, mode):
        unfreezes = config.unfreeze_every_steps is not None or config.unfreeze_every_epoch
        if unfreezes and mode in SHARDED:
            # measured under FSDP2: the losses part from one process's at the first unfreezing
            return (
                "gradual unfreezing turns weights trainable while training, and the sharding engine keeps to the "
                "weights that trained at its first step (use ddp)"
            )
        return None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = unwrap(model)
        blocks = transformer_blocks(inner)
        self.n_blocks = len(blocks)
        chosen = _block_indices(self.config, len(blocks))
        # groups: (lr exponent, parameters, label); block i has exponent L-1-i
        self.block_params: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        names = {id(p): n for n, p in inner.named_parameters()}
        for i in chosen:
            params = []
            for child in blocks[i].children():
                if role(child) in self.config.kinds:
                    params += [(names[id(p)], p) for p in child.parameters() if id(p) in names]
            self.block_params[i] = params
        extra: list[tuple[str, torch.nn.Parameter]] = []
        if self.config.embeddings:
            extra.append((names[id(inner.get_input_embeddings().weight)], inner.get_input_embeddings().weight))
        self.top_extra: list[tuple[str, torch.nn.Parameter]] = []
        head = inner.get_output_embeddings()
        if self.config.head and head is not None:
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
        parts = [
            f"blocks {_ranges(chosen)} of {self.n_blocks} ({', '.join(self.config.kinds)})" if chosen else None,
            "embeddings" if self.config.embeddings else None,
            "head" if self.config.head else None,
            "final norm" if self.config.final_norm else None,
            f"patterns {self.config.patterns}" if self.config.patterns else None,
        ]
        n = sum(p.numel() for _, p in self._own)
        line = f"layerwise trains {', '.join(x for x in parts if x)}: {n:,} parameters"
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
        return [GradualUnfreezing(self)] if self._unfreezing() else []

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


class GradualUnfreezing(TrainerCallback):
    """Freezes all but the first stage at train start, then unfreezes the next stage on schedule.

    The optimizer holds every stage's parameters from the start; a frozen parameter gets no gradient,
    and AdamW skips parameters without one, so a stage starts from fresh moments when it joins.
    """

    def __init__(self, strategy: Layerwise):
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
