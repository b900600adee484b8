"""The core strategy contract and its registry. docs/design.md ("The strategy contract") is the one-page
version; the optional capabilities are in :mod:`tunelab.strategies.capabilities`.

A strategy is a class with a ``name``, a one-line ``summary``, a ``Config`` (its options, each with a help
text), a ``default_lr`` and a :class:`Declaration` (``declares``, or ``declare(config)`` where it depends on
the options): its phase, whether it trains and saves, what its artefact is, whether it trains every
parameter or changes base weights, what it needs from the run (:class:`Need`) and what it adds that
another component's option may act on (:class:`Adds`). All of that is read before any model loads, and
``check(config, stack)`` refuses an option that would do nothing in the stack.

It **acts** through six methods, all called by :class:`tunelab.strategies.stack.StrategyStack` (the engine
and the run modes talk to the stack, never to a strategy or a strategy type):

1. ``apply(model)`` — what it does to the model (wrap it, insert modules); returns the model to train.
2. ``own_parameters(model)`` / ``param_groups(model, lr)`` — which parameters it trains, found by asking the
   modules (never by name strings), and their optimizer groups at the rate the stack resolved for it
   (``StrategyStack.rates``). The stack freezes everything, then unfreezes exactly their union.
3. ``disabled(model)`` — a context in which its additions are switched off, so the model gives the base
   model's outputs (for strategies that change base weights there is none: the run loads a frozen copy).
4. ``save(model, out_dir)`` / ``load(base_model, out_dir)`` — the final artefact, and how it goes back on a
   fresh base model.

plus ``describe(model)``, the line printed before training. Everything else is an optional capability the
stack discovers (``isinstance(s, LossTerm)``): extra loss terms, set-up, data hooks, schedules, task
routing, classifying, merging, being a baseline, limits under sharding.

Register a strategy with :func:`register_strategy` next to its code. The registry refuses duplicate or
malformed names, and a config class that lacks the ``name`` field.

Hybrids: ``strategy:`` takes a list. Strategies apply in ``phase`` order, whatever the list order: changes
to the architecture first (a student cut from its teacher), then PEFT tuners that inject layers (LoRA,
IA3, ...), then PEFT prompt learners that wrap the model (prefix, prompt, P-tuning), then native
strategies that edit the inner model (bottleneck adapters, layer-wise).
:func:`validate_strategy_specs` refuses combinations that cannot work, saying why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from tunelab.models import unwrap  # re-exported: strategies unwrap PEFT wrappers through base
from tunelab.schema import StrictModel
from tunelab.strategies.anatomy import StrategyError, transformer_blocks  # noqa: F401  (re-exported, as unwrap)
from tunelab.strategies.capabilities import Baseline, DataHook, Mergeable, ShardingLimits  # noqa: F401 (DataHook: re-exported)

_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


#: the training.distributed modes that shard the model across processes (the others hold it whole)
SHARDED = ("fsdp", "deepspeed")


class Phase(IntEnum):
    """Where a strategy applies in a hybrid; strategies apply in this order, whatever the list order."""

    STRUCTURE = -1  #: strategies that change the architecture first (a distillation student cut from its teacher)
    TUNER = 0  #: PEFT tuners that inject layers into the base model (LoRA, IA3, ...)
    PROMPT = 1  #: PEFT prompt learners that wrap the model (prefix, prompt, P-tuning)
    NATIVE = 2  #: native strategies that edit the inner model (bottleneck adapters, layer-wise, full)
    REGULARIZER = 3  #: strategies that train nothing themselves (EWC, L2-SP, retention, ...)


class Need(Enum):
    """What a strategy may need the run to provide (``Strategy.needs``)."""

    RETENTION = "the retention set: general prompts with the untouched base model's answers"
    BASE_OUTPUTS = "the base model's outputs: the model with additions disabled, or a frozen copy"
    LOGITS = "the training batch's logits at every position (``outputs.logits`` in ``loss_terms``)"
    LAYER_SCORES = "each block's importance for the task, measured on the untouched model (tunelab.layers)"


class Adds(Enum):
    """What a strategy adds to the model that another component's option may act on (``Declaration.adds``)."""

    LORA_LAYERS = "LoRA layers (their dropout is the dropout regularizer's ``lora`` option)"


@dataclass(frozen=True)
class Declaration:
    """What kind of strategy it is, read before any model loads (``Strategy.declares``, or
    ``Strategy.declare(config)`` where it depends on the options)."""

    #: application order in a hybrid (see :class:`Phase`)
    phase: Phase = Phase.NATIVE
    #: False for regularizers and baselines: they train nothing themselves
    trains: bool = True
    #: False when there is no artefact to write (regularizers, baselines, the student cut)
    saves: bool = True
    #: what ``save`` writes: "full" (a standalone model directory that transformers loads), "peft" (a PEFT
    #: adapter directory that peft loads) or "parts" (tunelab's own files, put back on a base by ``load``)
    artefact: Literal["full", "peft", "parts"] = "parts"
    #: True when it trains every parameter, so combining it with another training strategy adds nothing
    exclusive: bool = False
    #: True when it changes base weights (full, layer-wise, a cut student): the base model's outputs then
    #: need a frozen copy; otherwise disabling the added modules gives them
    changes_base_weights: bool = False
    #: what the run must provide to it (the retention set, the base model's outputs, the logits)
    needs: frozenset[Need] = frozenset()
    #: what it adds that another component's option may act on
    adds: frozenset[Adds] = frozenset()


@dataclass(frozen=True)
class StackFacts:
    """What ``Strategy.check`` may ask of the stack it is in: every component's declaration, and the run mode
    once it is known (None while only the strategy list is checked)."""

    declared: tuple[Declaration, ...]
    mode: str | None = None

    def adds(self, what: Adds) -> bool:
        return any(what in d.adds for d in self.declared)

    @property
    def saves_whole_model(self) -> bool:
        """Some component's artefact is the whole model (full fine-tuning)."""
        return any(d.artefact == "full" for d in self.declared)


class StrategyConfig(StrictModel):
    """Base of every strategy's options. Subclasses add fields, each with a description (its help text).
    Unknown keys fail, and no boolean is read as a number (tunelab.schema)."""

    name: str = Field(description="Registered strategy name.")
    lr: float | None = Field(None, gt=0, le=1, description="Learning rate for this strategy's parameters.")


class PerTaskConfig(StrategyConfig):
    """Options of a strategy that can keep one copy of its parts per task (mode: multitask)."""

    per_task: bool = Field(
        False, description="mode: multitask: one copy per task (its own adapter, routed by task name), not shared."
    )


class Strategy:
    """A fine-tuning strategy: the core contract (see the module docstring). Subclasses set ``name``,
    ``summary``, ``Config``, ``default_lr`` and ``declares``, implement ``apply``, ``own_parameters``,
    ``save`` and ``load`` (and ``disabled`` when they add modules that act on outputs), and take optional
    capabilities from :mod:`tunelab.strategies.capabilities`."""

    name: ClassVar[str]
    #: One line for ``tunelab strategies``: what trains, and how.
    summary: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    default_lr: ClassVar[float] = 1e-4
    #: What kind of strategy it is (:class:`Declaration`); :meth:`declare` when it depends on the options.
    declares: ClassVar[Declaration] = Declaration()

    def __init__(self, config: StrategyConfig):
        self.config = config

    @classmethod
    def declare(cls, config: StrategyConfig) -> Declaration:
        """What kind of strategy it is with these options (default: ``declares``)."""
        return cls.declares

    @classmethod
    def check(cls, config: StrategyConfig, stack: StackFacts) -> None:
        """Refuse, with a ValueError saying why, an option that would do nothing or cannot work in this stack
        (every component's declaration, this one's included) and, once it is known, this run mode."""

    # -- 1. the model ------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    # -- 2. what trains ----------------------------------------------------------------------------
    def own_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters this strategy trains (after ``apply``), found by asking the modules."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups; ``lr`` is this strategy's rate, as the stack resolved it (StrategyStack.rates)."""
        params = [p for _, p in self.own_parameters(model)]
        return [{"params": params, "lr": lr, "name": self.name}] if params else []

    def describe(self, model: torch.nn.Module) -> str | None:
        """A line printed before training saying what trains (e.g. the chosen layers); None for nothing."""
        return None

    # -- 3. switching off ------------------------------------------------------------------------
    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        """Its additions off for the duration (default: it adds nothing that acts on outputs)."""
        yield

    # -- 4. artefacts ------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        raise NotImplementedError


class Regularizer(Strategy, Mergeable):
    """A strategy that trains nothing itself: it adds loss terms, data or callbacks to the strategies that
    train, and acts on exactly their trainable parameters (so its memory is bounded by theirs). It leaves
    nothing in the weights to merge."""

    declares = Declaration(phase=Phase.REGULARIZER, trains=False, saves=False)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def own_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return []

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        return []

    @staticmethod
    def trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters the training strategies chose (called after ``mark_trainable``)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        pass

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        return base_model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``strategy: <cls.name>`` in configs."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"strategy name {name!r} must match {_NAME.pattern}")
    if name in _REGISTRY:
        raise ValueError(f"strategy '{name}' is already registered by {_REGISTRY[name].__module__}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StrategyConfig)):
        raise TypeError(f"{cls.__name__}.Config must subclass StrategyConfig")
    if not cls.summary or "\n" in cls.summary:
        raise ValueError(f"strategy '{name}' needs a one-line `summary` (shown by `tunelab strategies`)")
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
    check_combination(configs)
    return configs


def check_distributed(configs: list[StrategyConfig], mode: str) -> None:
    """Refuse, saying why, strategies that cannot train under ``mode`` (``training.distributed``)."""
    for c in configs:
        cls = get_strategy(c.name)
        why = cls.distributed_problem(c, mode) if issubclass(cls, ShardingLimits) else None
        if why:
            raise ValueError(f"strategy {c.name} cannot train with distributed: {mode}: {why}")


def is_baseline(configs: Iterable[StrategyConfig]) -> bool:
    """A prompting baseline (it combines with no other strategy): the untouched model is scored, nothing
    trains. The one place this is asked."""
    return any(issubclass(get_strategy(c.name), Baseline) for c in configs)


def check_in_mode(configs: list[StrategyConfig], mode: str) -> None:
    """Each component's :meth:`Strategy.check` again, now that the run mode is known; a refusal names the
    component by its place in the list (``strategy.1: ...``), which the config error maps to its line."""
    classes = [get_strategy(c.name) for c in configs]
    facts = StackFacts(tuple(cls.declare(c) for cls, c in zip(classes, configs, strict=True)), mode)
    for i, (cls, c) in enumerate(zip(classes, configs, strict=True)):
        try:
            cls.check(c, facts)
        except ValueError as e:
            raise ValueError(f"strategy.{i}: {e}") from None


def check_combination(configs: list[StrategyConfig]) -> None:
    """Refuse hybrids that cannot work, with the reason."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a strategy appears twice: {names}")
    classes = [get_strategy(c.name) for c in configs]
    if is_baseline(configs):
        if len(configs) > 1:
            first = next(cls.name for cls in classes if issubclass(cls, Baseline))
            raise ValueError(
                f"{first} scores the untouched model without training; it combines with no other strategy "
                f"(got {' + '.join(names)}): compare it with them instead"
            )
        return
    declared = [cls.declare(c) for cls, c in zip(classes, configs, strict=True)]
    if not any(d.trains for d in declared):
        raise ValueError(
            f"{' + '.join(names)} train nothing by themselves; add a strategy that trains, "
            "e.g. [full, ewc] or [lora, retention]"
        )
    for cls, c in zip(classes, configs, strict=True):
        cls.check(c, StackFacts(tuple(declared)))
    if len(configs) < 2:
        return
    for cls, d in zip(classes, declared, strict=True):
        trained_too = [o.name for o, od in zip(classes, declared, strict=True) if od.trains and o is not cls]
        if d.exclusive and trained_too:
            others = " + ".join(trained_too)
            raise ValueError(
                f"'{cls.name}' trains every parameter, so combining it with {others} adds nothing; "
                "use 'layerwise' to choose which base weights train beside another strategy"
            )
    for phase, what in (
        (Phase.TUNER, "PEFT tuner (lora, ia3, peft ...)"),
        (Phase.PROMPT, "PEFT prompt learner (prefix, prompt, ptuning)"),
    ):
        same = [cls.name for cls, d in zip(classes, declared, strict=True) if d.phase == phase]
        if len(same) > 1:
            raise ValueError(
                f"at most one {what} per run, got {' + '.join(same)}: PEFT cannot stack two of them "
                "in one model and save each as a loadable adapter"
            )


def build_strategies(configs: Iterable[StrategyConfig]) -> list[Strategy]:
    """Strategy objects in application order (see the module docstring)."""
    strategies = [get_strategy(c.name)(c) for c in configs]
    return sorted(strategies, key=lambda s: s.declare(s.config).phase)


def load_named_tensors(model: torch.nn.Module, path: Path, *, plain: bool = True) -> None:
    """Copy the tensors of a safetensors file into the same-named parameters of the plain model inside
    ``model`` (of ``model`` itself with ``plain=False``); a tensor with no such parameter is an error (the
    file belongs to another model)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = dict((unwrap(model) if plain else model).named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise StrategyError(f"{path}: tensors {missing[:3]} do not fit this model")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


def mark_trainable(model: torch.nn.Module, strategies: list[Strategy]) -> dict[str, int]:
    """Freeze every parameter, then unfreeze each strategy's own. Returns trainable counts per strategy."""
    for p in model.parameters():
        p.requires_grad_(False)
    counts, seen = {}, set()
    for s in strategies:
        if not s.declare(s.config).trains:
            continue
        own = s.own_parameters(model)
        if not own:
            raise StrategyError(f"strategy {s.name} selects no parameter to train in this model")
        overlap = [n for n, p in own if id(p) in seen]
        if overlap:
            raise StrategyError(f"strategy {s.name} would train parameters another strategy trains: {overlap[:3]}")
        for _, p in own:
            p.requires_grad_(True)
            seen.add(id(p))
        counts[s.name] = sum(p.numel() for _, p in own)
    return counts
