"""Bottleneck adapters, native (PEFT has none; the ``adapters`` library pins transformers 4.57).

An adapter is a small residual MLP on a hidden state ``h`` of width ``d``::

    f(h) = W_up · act(W_down · h + b_down) + b_up        W_down: m x d, W_up: d x m, m = bottleneck
    adapter(h) = h + f(h)   (residual: true)      or      f(h)   (residual: false)

Placements (``placement``), in every transformer block:

- ``houlsby`` (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1): two adapters,
  one on the attention output and one on the MLP output, each before the block's residual add.
- ``pfeiffer`` (Pfeiffer et al., 2021, "AdapterFusion", §3): one adapter on the MLP output.
- ``parallel`` (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", §3):
  one adapter beside the MLP, reading the MLP's input: ``mlp(x) + scale · f(x)``.

Initialisation: ``W_down`` Kaiming-uniform (as ``nn.Linear``), ``W_up`` and ``b_up`` zero, so ``f = 0`` and the
adapted model's outputs equal the base model's at step 0 (tested). Trainable parameters per adapter:
``2·d·m + m + d``; the total is that times the adapters per block (2, 1, 1) times the blocks (tested).

The adapters are attached to the blocks as sub-modules and act through forward hooks, so the base
model's parameter names, and any PEFT layers on it, are untouched. Saved as safetensors of the adapter
weights + ``bottleneck_config.json``; reloaded into a fresh base model with identical outputs.

With ``per_task: true`` (mode: multitask) each insertion point holds one adapter per task
(:class:`TaskAdapters`) and the hook runs the selected task's; the artefact holds every task's weights under
``...bottleneck_<where>.tasks.<task>.*`` with the task list in ``bottleneck_config.json``.

When to choose them: a classic, robust PEFT baseline with a small inference cost (extra layers, not
mergeable), good when LoRA's linear updates are not expressive enough or for stacking per-task adapters.
Works for Llama-family and GPT-2-family blocks (any block whose children include an ``*Attention`` and an
``*MLP`` module).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import save_file

from tunelab.strategies.anatomy import part
from tunelab.strategies.base import (
    PerTaskConfig,
    Strategy,
    StrategyError,
    load_named_tensors,
    register_strategy,
    transformer_blocks,
    unwrap,
)
from tunelab.strategies.capabilities import PerTask

CONFIG_FILE, WEIGHTS_FILE = "bottleneck_config.json", "bottleneck_adapters.safetensors"
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
PER_BLOCK = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}


class AdaptersConfig(PerTaskConfig):
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field("pfeiffer", description="Where adapters go.")
    bottleneck: int | None = Field(None, gt=0, description="Bottleneck width m (default: d / reduction_factor).")
    reduction_factor: float = Field(16, gt=0, description="m = hidden size / reduction_factor, if no bottleneck.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Non-linearity.")
    residual: bool = Field(True, description="Add the adapter's input to its output (serial placements).")
    scale: float = Field(1.0, gt=0, description="Scale of the adapter branch (parallel placement).")

    @model_validator(mode="after")
    def _residual_only_serial(self):
        if self.placement == "parallel" and not self.residual:
            raise ValueError("residual applies to serial placements; the parallel adapter is added beside the MLP")
        return self

    def width(self, hidden: int) -> int:
        return self.bottleneck or max(1, round(hidden / self.reduction_factor))


class BottleneckAdapter(torch.nn.Module):
    tunelab_added = True  # anatomy.ADDED: no role in the block it sits in

    def __init__(self, hidden: int, bottleneck: int, activation: str, residual: bool, scale: float = 1.0):
        super().__init__()
        self.down = torch.nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(bottleneck, hidden)
        torch.nn.init.zeros_(self.up.weight)  # f(h) = 0 at step 0: the model starts as the base model
        torch.nn.init.zeros_(self.up.bias)
        self.residual, self.scale, self.enabled = residual, scale, True

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h) if self.residual else self.branch(h)


class TaskAdapters(torch.nn.Module):
    """One adapter per task at one insertion point; acts as the selected task's adapter."""

    tunelab_added = True  # anatomy.ADDED: no role in the block it sits in

    def __init__(self, tasks: list[str], make):
        super().__init__()
        self.tasks = torch.nn.ModuleDict({t: make() for t in tasks})
        self.active, self.enabled = tasks[0], True

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.tasks[self.active].branch(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tasks[self.active](h)


def _serial_hook(adapter: BottleneckAdapter | TaskAdapters):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def _parallel_hook(adapter: BottleneckAdapter | TaskAdapters):
    def hook(module, args, kwargs, output):
        if not adapter.enabled:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        return output + adapter.branch(x)

    return hook


def insert_adapters(
    model: torch.nn.Module, cfg: AdaptersConfig, tasks: list[str] | None = None
) -> list[BottleneckAdapter | TaskAdapters]:
    """Attach adapters to every block of the plain model inside ``model`` (one per task at each point when
    ``tasks`` is given); returns them in order."""
    inner = unwrap(model)
    hidden = inner.config.hidden_size
    m = cfg.width(hidden)
    added = []

    def make() -> BottleneckAdapter:
        return BottleneckAdapter(hidden, m, cfg.activation, cfg.residual, cfg.scale)

    for block in transformer_blocks(inner):
        for where in PER_BLOCK[cfg.placement]:
            target = part(block, "attention" if where == "attn" else "mlp")
            adapter = TaskAdapters(tasks, make) if tasks else make()
            adapter.to(device=next(target.parameters()).device)
            block.add_module(f"bottleneck_{where}", adapter)
            if cfg.placement == "parallel":
                target.register_forward_hook(_parallel_hook(adapter), with_kwargs=True)
            else:
                target.register_forward_hook(_serial_hook(adapter))
            added.append(adapter)
    return added


def expected_parameters(hidden: int, layers: int, cfg: AdaptersConfig) -> int:
    m = cfg.width(hidden)
    return layers * len(PER_BLOCK[cfg.placement]) * (2 * hidden * m + m + hidden)


@register_strategy
class Adapters(Strategy, PerTask):
    name = "adapters"
    summary = "Bottleneck adapters (Houlsby, Pfeiffer or parallel), native; the base stays frozen."
    Config = AdaptersConfig
    default_lr = 1e-3

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.adapters = insert_adapters(model, self.config, self.tasks if self.per_task else None)
        return model

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        if not self.per_task:
            return
        routed = [m for m in model.modules() if isinstance(m, TaskAdapters)]
        if not routed or name not in routed[0].tasks:
            raise StrategyError(f"strategy {self.name}: no adapter for task {name!r}")
        for m in routed:
            m.active = name

    def own_parameters(self, model):
        return [
            (f"{type(a).__name__}[{i}].{n}", p)
            for i, a in enumerate(self.adapters)
            for n, p in a.named_parameters()
        ]

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        on = [
            m for m in model.modules() if isinstance(m, BottleneckAdapter | TaskAdapters) and m.enabled
        ]  # also after load()
        for m in on:
            m.enabled = False
        try:
            yield
        finally:
            for m in on:
                m.enabled = True

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        inner = unwrap(model)
        ids = {id(a) for a in self.adapters}
        tensors = {}
        for mname, module in inner.named_modules():
            if id(module) in ids:
                tensors.update(
                    {f"{mname}.{n}": p.detach().contiguous().cpu() for n, p in module.named_parameters()}
                )
        save_file(tensors, out_dir / WEIGHTS_FILE)
        meta = {**self.config.model_dump(), **({"tasks": self.tasks} if self.per_task else {})}
        (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        meta = json.loads((out_dir / CONFIG_FILE).read_text())
        tasks = meta.pop("tasks", None)
        cfg = AdaptersConfig.model_validate(meta)
        insert_adapters(base_model, cfg, tasks)
        load_named_tensors(base_model, out_dir / WEIGHTS_FILE)
        return base_model
