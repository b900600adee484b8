"""The strategy contract and its registry. This docstring is the one place the contract is written down.

A strategy is a class with a ``name``, a one-line ``summary``, a ``Config`` (its options, each with a help
text) and a ``default_lr``, registered with :func:`register_strategy` next to its code. It **declares**, as class
attributes or classmethods of its options (read before any model loads):

- ``phase_of(config)`` — a :class:`Phase`, where it applies in a hybrid;
- ``needs(config)`` — what it needs from the run, a set of :class:`Need` (the retention set, the base
  model's outputs); a teacher or any other model it loads itself, through ``ctx.load_model``;
- ``trains``, ``saves``, ``artefact`` ("full", "peft" or "parts"), ``mergeable``, ``exclusive``,
  ``changes_base_weights`` — what kind of strategy it is;
- ``provides(config)`` / ``check_stack(config, provided)`` — what it adds that another component's
  option may act on, and which of its own options would do nothing in a given stack (refused);
- ``distributed_problem(config, mode)`` — why it cannot train in several processes under DDP, FSDP or
  DeepSpeed, if it cannot (refused).

and it **acts** through these hooks, all called by :class:`tunelab.strategies.stack.StrategyStack` (the
engine and the run modes talk to the stack, never to a strategy or a strategy type):

1. ``apply(model)`` — what it does to the model (wrap it, insert modules); returns the model to train.
2. ``own_parameters(model)`` / ``param_groups(model, lr)`` — which parameters it trains, found by asking the
   modules (never by name strings), and at which rates (``lr`` is ``training.lr`` or None; its own ``lr``
   option and ``default_lr`` decide otherwise). The stack freezes everything, then unfreezes exactly the
   union of the strategies' own parameters.
3. ``loss_terms(model, inputs, outputs)`` / ``task_loss_weight()`` — extra terms on training steps (never
   on ``eval_loss``), and a factor on the task loss (distillation).
4. ``prepare(model, ctx)`` / ``training_features(features, ctx)`` / ``on_task_end(model, ctx)`` /
   ``callbacks()`` — set-up once the trainable set is known (EWC's Fisher), the training rows (replay),
   the end of a continual task (online EWC), and ``TrainerCallback`` schedules (gradual unfreezing).
   ``ctx`` is a :class:`tunelab.context.RunContext`.
5. ``disabled(model)`` — a context in which its additions are switched off, so the model gives the base
   model's outputs (for strategies that change base weights there is none: the run loads a frozen copy).
6. ``save(model, out_dir)`` / ``load(base_model, out_dir)`` / ``merge(model)`` — the final artefact, how it
   goes back on a fresh base model, and how it folds into plain weights.
7. ``select_task(model, name)`` / ``classify(...)`` — multi-task: with ``per_task`` a strategy builds a copy
   per task in ``apply`` (``self.tasks``) and routes the model here, acting on the model alone (so a model
   read back from disk routes the same way); a classifier (heads) scores prompts without generating.

Register a strategy with :func:`register_strategy` next to its code. The registry refuses duplicate or
malformed names, and a config class that lacks the ``name`` field.

Hybrids: ``strategy:`` takes a list. Strategies apply in ``phase`` order, whatever the list order: changes
to the architecture first (a student cut from its teacher), then PEFT tuners that inject layers (LoRA,
IA3, ...), then PEFT prompt learners that wrap the model (prefix, prompt, P-tuning), then native
strategies that edit the inner model (bottleneck adapters, layer-wise).
:func:`validate_strategy_specs` refuses combinations that cannot work, saying why.

Long because it is the contract in one place: this text, the base class with every hook's default, and the
registry and combination checks that enforce it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from tunelab.data import Shots
from tunelab.models import unwrap  # re-exported: strategies unwrap PEFT wrappers through base
from tunelab.schema import StrictModel

_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


#: the training.distributed modes that shard the model across processes (the others hold it whole)
SHARDED = ("fsdp", "deepspeed")


class StrategyError(ValueError):
    """A strategy cannot be applied to this model as configured (e.g. target modules that match nothing)."""


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
    """A fine-tuning strategy. Subclasses set ``name``, ``Config`` and ``default_lr`` and override hooks."""

    name: ClassVar[str]
    #: One line for ``tunelab strategies``: what trains, and how.
    summary: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    default_lr: ClassVar[float] = 1e-4
    #: What ``save`` writes: "full" (a standalone model directory that transformers loads), "peft" (a PEFT
    #: adapter directory that peft loads) or "parts" (tunelab's own files, put back on a base by ``load``).
    artefact: ClassVar[Literal["full", "peft", "parts"]] = "parts"
    #: Application order in a hybrid (see :class:`Phase`); :meth:`phase_of` when it depends on the options.
    phase: ClassVar[Phase] = Phase.NATIVE
    #: True when the strategy trains every parameter, so combining it with another adds nothing.
    exclusive: ClassVar[bool] = False
    #: Whether ``merge`` can fold it into plain weights.
    mergeable: ClassVar[bool] = False
    #: False for regularizers: they train nothing themselves, they add loss terms, data or callbacks.
    trains: ClassVar[bool] = True
    #: False when there is no artefact to write (regularizers).
    saves: ClassVar[bool] = True
    #: True when it changes base weights (full, layer-wise): the base model's outputs then need a frozen
    #: copy; otherwise disabling the added modules gives them.
    changes_base_weights: ClassVar[bool] = False
    #: True for a baseline that scores the untouched model (prompting): no training run, no artefact, and
    #: ``prompt_examples(config)`` training rows shown in every scored prompt.
    baseline: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig):
        self.config = config  # multi-task runs: the stack sets the task names and label sets before ``apply``
        self.tasks: list[str] = []
        self.task_labels: dict[str, list[str] | None] = {}

    per_task = property(lambda self: bool(getattr(self.config, "per_task", False)))  # a copy per task

    @classmethod
    def phase_of(cls, config: StrategyConfig) -> Phase:
        """The phase for these options (the ``peft`` pass-through is a tuner or a prompt learner by type)."""
        return cls.phase

    @classmethod
    def needs(cls, config: StrategyConfig) -> frozenset[Need]:
        """What the run must provide to this strategy (read before the model loads)."""
        return frozenset()

    @classmethod
    def prompt_examples(cls, config: StrategyConfig) -> Shots:
        """Baselines: the training rows shown, as solved examples, before every scored prompt, and the
        instruction it is scored with (:class:`tunelab.data.Shots`)."""
        return Shots()

    @classmethod
    def provides(cls, config: StrategyConfig) -> frozenset[str]:
        """What this strategy adds to the model that another component's option may act on
        (``"lora-layers"``: LoRA layers, whose dropout the ``dropout`` regularizer can set)."""
        return frozenset()

    @classmethod
    def check_stack(cls, config: StrategyConfig, provided: frozenset[str]) -> None:
        """Refuse, with a ValueError saying why, an option that would do nothing in this stack;
        ``provided`` is the union of every component's :meth:`provides`."""

    @classmethod
    def distributed_problem(cls, config: StrategyConfig, mode: str) -> str | None:
        """Why this strategy cannot train in several processes under ``mode`` (``ddp``, ``fsdp``,
        ``deepspeed``: ``training.distributed``), or None. DDP runs the model's forward in each process and
        averages gradients in its backward; FSDP and DeepSpeed ZeRO-3 also replace the model's parameters
        with shards while it trains."""
        return None

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

    # -- 3. extra loss terms -----------------------------------------------------------------------
    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Terms added to the loss of **training** steps only (never to ``eval_loss``), each logged as
        ``loss_terms/<strategy>/<name>`` beside ``loss_terms/task``."""
        return {}

    def task_loss_weight(self) -> float:
        """Factor on the task loss in training steps (distillation: ``α`` in ``α·CE + (1-α)·KL``)."""
        return 1.0

    def prepare(self, model: torch.nn.Module, ctx: Any) -> None:
        """Called once the trainable set is known, before training (EWC estimates its Fisher here).
        ``ctx`` is a :class:`tunelab.run.Context`: tokenizer, device, retention set, base reference, ..."""

    def training_features(self, features: list[dict], ctx: Any) -> list[dict]:
        """The tokenized training rows; replay mixes in earlier examples here."""
        return features

    def on_task_end(self, model: torch.nn.Module, ctx: Any) -> None:
        """Continual learning: called after each task (online EWC accumulates its Fisher here)."""

    # -- 4. callbacks ------------------------------------------------------------------------------
    def callbacks(self) -> list:
        return []

    # -- 5. switching off ------------------------------------------------------------------------
    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        """Its additions off for the duration (default: it adds nothing that acts on outputs)."""
        yield

    # -- 6. artefacts ------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        raise NotImplementedError

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError(f"strategy '{self.name}' has nothing to merge")

    # -- 7. multi-task routing ----------------------------------------------------------------------
    def select_task(self, model: torch.nn.Module, name: str) -> None:
        """Route ``model`` to task ``name``'s parts (per-task strategies; a shared one does nothing)."""

    def classify(self, model, input_ids, attention_mask, bf16: bool) -> torch.Tensor | None:
        """Class logits ``[B, labels]`` for prompts, when the strategy adds a classifier (heads), else None."""


class Regularizer(Strategy):
    """A strategy that trains nothing itself: it adds loss terms, data or callbacks to the strategies that
    train, and acts on exactly their trainable parameters (so its memory is bounded by theirs)."""

    phase = Phase.REGULARIZER
    trains = False
    saves = False
    mergeable = True

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
        why = get_strategy(c.name).distributed_problem(c, mode)
        if why:
            raise ValueError(f"strategy {c.name} cannot train with distributed: {mode}: {why}")


def check_combination(configs: list[StrategyConfig]) -> None:
    """Refuse hybrids that cannot work, with the reason."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a strategy appears twice: {names}")
    classes = [get_strategy(c.name) for c in configs]
    baselines = [cls.name for cls in classes if cls.baseline]
    if baselines and len(configs) > 1:
        raise ValueError(
            f"{baselines[0]} scores the untouched model without training; it combines with no other strategy "
            f"(got {' + '.join(names)}): compare it with them instead"
        )
    if baselines:
        return
    if not any(cls.trains for cls in classes):
        raise ValueError(
            f"{' + '.join(names)} train nothing by themselves; add a strategy that trains, "
            "e.g. [full, ewc] or [lora, retention]"
        )
    provided = frozenset().union(*(cls.provides(c) for cls, c in zip(classes, configs, strict=True)))
    for cls, c in zip(classes, configs, strict=True):
        cls.check_stack(c, provided)
    if len(configs) < 2:
        return
    for cls in classes:
        trained_too = [c.name for c in classes if c.trains and c is not cls]
        if cls.exclusive and trained_too:
            others = " + ".join(trained_too)
            raise ValueError(
                f"'{cls.name}' trains every parameter, so combining it with {others} adds nothing; "
                "use 'layerwise' to choose which base weights train beside another strategy"
            )
    for phase, what in (
        (Phase.TUNER, "PEFT tuner (lora, ia3, peft ...)"),
        (Phase.PROMPT, "PEFT prompt learner (prefix, prompt, ptuning)"),
    ):
        same = [cls.name for cls, c in zip(classes, configs, strict=True) if cls.phase_of(c) == phase]
        if len(same) > 1:
            raise ValueError(
                f"at most one {what} per run, got {' + '.join(same)}: PEFT cannot stack two of them "
                "in one model and save each as a loadable adapter"
            )


def build_strategies(configs: Iterable[StrategyConfig]) -> list[Strategy]:
    """Strategy objects in application order (see the module docstring)."""
    strategies = [get_strategy(c.name)(c) for c in configs]
    return sorted(strategies, key=lambda s: s.phase_of(s.config))


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the longest ModuleList whose length is the model's layer count."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise StrategyError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


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
        if not s.trains:
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
