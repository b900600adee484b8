"""The strategy contract and its registry.

A strategy says five things, and nothing else (STYLE.md, "one strategy, one module, one small contract"):

1. ``apply(model)``: what it does to the model (wrap it, insert modules, freeze parameters). It returns
   the model to train.
2. ``param_groups(model, lr)``: which parameters train and with which learning rate.
3. ``loss_terms(model, inputs, outputs)``: extra loss terms the engine adds to the task loss
   (a penalty such as EWC, a distillation loss). The engine sums them without knowing what they are.
4. ``callbacks()``: ``transformers.TrainerCallback`` objects (schedules such as gradual unfreezing).
5. ``save(model, out_dir)`` / ``load(base_model, out_dir)`` / ``merge(model)``: what it writes as the final
   artefact, how that is put back on a fresh base model, and how it is folded into plain weights.

Register a strategy with :func:`register_strategy` next to its code. The registry refuses duplicate or
malformed names, and a config class that lacks the ``name`` field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StrategyError(ValueError):
    """A strategy cannot be applied to this model as configured (e.g. target modules that match nothing)."""


class StrategyConfig(BaseModel):
    """Base of every strategy's options. Subclasses add fields, each with a description (its help text)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str = Field(description="Registered strategy name.")
    lr: float | None = Field(None, gt=0, le=1, description="Learning rate for this strategy's parameters.")


class Strategy:
    """A fine-tuning strategy. Subclasses set ``name``, ``Config`` and ``default_lr`` and override hooks."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    default_lr: ClassVar[float] = 1e-4
    #: What ``save`` writes: "full" (a standalone model directory) or "adapter" (weights on top of a base).
    artefact: ClassVar[str] = "adapter"

    def __init__(self, config: StrategyConfig):
        self.config = config

    # -- 1. the model ------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    # -- 2. what trains ----------------------------------------------------------------------------
    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self, model: torch.nn.Module, lr: float | None) -> list[dict[str, Any]]:
        """Optimizer groups. ``lr`` is training.lr; the strategy's own ``lr`` option wins over it."""
        lr = self.config.lr or lr or self.default_lr
        params = [p for _, p in self.trainable_parameters(model)]
        return [{"params": params, "lr": lr, "name": self.name}] if params else []

    # -- 3. extra loss terms -----------------------------------------------------------------------
    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    # -- 4. callbacks ------------------------------------------------------------------------------
    def callbacks(self) -> list:
        return []

    # -- 5. artefacts ------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        raise NotImplementedError

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError(f"strategy '{self.name}' has nothing to merge")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``strategy: <cls.name>`` in configs."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"strategy name {name!r} must match {_NAME.pattern}")
    if name in _REGISTRY:
        raise ValueError(f"strategy '{name}' is already registered by {_REGISTRY[name].__module__}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StrategyConfig)):
        raise TypeError(f"{cls.__name__}.Config must subclass StrategyConfig")
    _REGISTRY[name] = cls
    return cls


def registered() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy '{name}'; registered: {', '.join(sorted(_REGISTRY))}") from None


def _one_spec(spec: Any) -> StrategyConfig:
    if isinstance(spec, StrategyConfig):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ValueError("a strategy is a name or a mapping with a `name` key and its options")
    if "name" not in spec:
        raise ValueError(f"strategy needs a `name`; registered: {', '.join(sorted(_REGISTRY))}")
    cls = get_strategy(spec["name"])
    return cls.Config.model_validate(spec)


def validate_strategy_specs(value: Any) -> list[StrategyConfig]:
    """Turn ``lora`` / ``{name: lora, r: 8}`` / a list of those into validated strategy configs."""
    specs = value if isinstance(value, list) else [value]
    if not specs:
        raise ValueError("at least one strategy is needed")
    configs = [_one_spec(s) for s in specs]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a strategy appears twice: {names}")
    if len(configs) > 1:
        # Combinations are the subject of their own work; until each pair is tested, refuse them.
        raise ValueError(f"combining strategies ({' + '.join(names)}) is not supported yet; choose one")
    return configs


def build_strategies(configs: Iterable[StrategyConfig]) -> list[Strategy]:
    return [get_strategy(c.name)(c) for c in configs]
