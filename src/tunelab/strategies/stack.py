"""The stack of a run's strategies: the one object the engine, the run modes and the read-back API talk to.

It owns everything that spans strategies, so no module outside ``strategies/`` iterates over them or asks
what type one is: the application order (phases), marking exactly the strategies' own parameters
trainable, the optimizer's parameter groups and their learning rates, the training loss (the task loss,
weighted where a strategy asks, plus every term), callbacks, the data and set-up hooks, switching every
addition off (for the base model's outputs), and the artefact (save, load, merge).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Shots
from tunelab.strategies.base import (
    Declaration,
    Need,
    Strategy,
    StrategyConfig,
    StrategyError,
    build_strategies,
    get_strategy,
    mark_trainable,
    transformer_blocks,
)
from tunelab.strategies.capabilities import (
    Baseline,
    Classifier,
    DataHook,
    LossTerm,
    Measured,
    Mergeable,
    Reports,
    Scheduled,
    SetUp,
    TaskRouter,
)


class StrategyStack:
    def __init__(self, configs: Iterable[StrategyConfig]):
        self.items: list[Strategy] = build_strategies(configs)  # in application (phase) order
        self.components: dict[str, int] = {}  # trainable parameters per strategy, after apply()
        self.declared: dict[str, Declaration] = {s.name: s.declare(s.config) for s in self.items}
        self._terms = self._with(LossTerm)  # asked once: training_loss runs every step

    def _with(self, capability: type) -> list:
        """The components that have ``capability`` (a protocol of tunelab.strategies.capabilities)."""
        return [s for s in self.items if isinstance(s, capability)]

    def _trains(self, s: Strategy) -> bool:
        return self.declared[s.name].trains

    def __iter__(self) -> Iterator[Strategy]:
        return iter(self.items)

    # -- what the stack is ------------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[Need]:
        return frozenset().union(*(d.needs for d in self.declared.values()))

    @property
    def changes_base_weights(self) -> bool:
        """True when base weights train: the base model's outputs then need a frozen copy."""
        return any(d.changes_base_weights for d in self.declared.values())

    @property
    def baseline(self) -> bool:
        """A prompting baseline: the untouched model is scored, nothing trains."""
        return bool(self._with(Baseline))

    @property
    def changes_rows(self) -> list[str]:
        """The components that change the training rows before training (they need them all at hand)."""
        return [s.name for s in self._with(DataHook)]

    @property
    def prompt_examples(self) -> Shots:
        """What the baseline shows before each scored prompt (a baseline combines with no other strategy)."""
        return next((type(s).prompt_examples(s.config) for s in self._with(Baseline)), Shots())

    @property
    def standalone(self) -> bool:
        """The artefact is a whole model (full fine-tuning), not additions to a base model."""
        return bool(self._savers) and all(self.declared[s.name].artefact == "full" for s in self._savers)

    @property
    def not_mergeable(self) -> list[str]:
        """Components that cannot fold into plain weights (per-task parts: which task's would it be?)."""
        return [s.name for s in self.items if not isinstance(s, Mergeable) or s in self._routers]

    @property
    def routes_tasks(self) -> bool:
        """Some component keeps one copy per task: the model must be routed to a task before use."""
        return bool(self._routers)

    @property
    def _routers(self) -> list[Strategy]:
        """The components that keep one copy per task."""
        return [s for s in self._with(TaskRouter) if s.per_task]

    @property
    def artefact_kind(self) -> str:
        """What the run's ``model/`` holds, and so what loads it: ``model`` (a whole model: transformers),
        ``peft`` (one PEFT adapter: peft), ``parts`` (tunelab's own parts, or a hybrid's components, over the
        base model: tunelab), ``per-task`` (parts per task: tunelab, then a task is selected), ``none`` (a
        baseline: nothing trained, the base model is the model)."""
        if not self._savers:
            return "none"
        if self.standalone:
            return "model"
        if self.routes_tasks:
            return "per-task"
        one_peft = len(self._savers) == 1 and self.declared[self._savers[0].name].artefact == "peft"
        return "peft" if one_peft else "parts"

    @property
    def task_names(self) -> list[str]:
        """The tasks of a component that keeps one copy per task (multi-task), else none."""
        return next((list(s.tasks) for s in self._routers), [])

    @property
    def given_tasks(self) -> tuple[list[str], dict[str, list[str] | None]]:
        """The task names and label sets :meth:`set_tasks` gave the task routers (none outside multi-task runs,
        or in a stack without routers)."""
        routers = self._with(TaskRouter)
        return (list(routers[0].tasks), dict(routers[0].task_labels)) if routers else ([], {})

    @property
    def saved_specs(self) -> list[dict[str, Any]]:
        """The options of the components that save something: with the base model, all that loading the
        artefact needs (a regularizer's options, a teacher's path among them, are not)."""
        return [s.config.model_dump(mode="json") for s in self._savers]

    @property
    def _savers(self) -> list[Strategy]:
        return [s for s in self.items if self.declared[s.name].saves]

    # -- the model ----------------------------------------------------------------------------------
    def set_tasks(self, names: list[str], labels: dict[str, list[str] | None] | None = None) -> None:
        """Multi-task runs: the task names (and label sets), before ``apply``: per-task components build a
        copy per task."""
        for s in self._with(TaskRouter):
            s.set_tasks(names, dict(labels or {}))

    def classify(self, model: torch.nn.Module, input_ids, attention_mask, bf16: bool) -> torch.Tensor | None:
        """Class logits from the first component that classifies (heads), else None."""
        for s in self._with(Classifier):
            logits = s.classify(model, input_ids, attention_mask, bf16)
            if logits is not None:
                return logits
        return None

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        """Route every per-task component of ``model`` to task ``name``."""
        for s in self._with(TaskRouter):
            s.select_task(model, name)

    # -- measured choices (tunelab.layers) ----------------------------------------------------------
    def estimators(self) -> tuple[str, ...]:
        """The block measurements the components need before ``apply`` (Need.LAYER_SCORES)."""
        return tuple(sorted({e for s in self._with(Measured) for e in s.estimators()}))

    def measured(self, scores: Any) -> None:
        for s in self._with(Measured):
            s.measured(scores)

    def reports(self) -> dict[str, dict[str, Any]]:
        """What the components decided, for summary.json (``strategies.<name>``)."""
        return {s.name: r for s in self._with(Reports) if (r := s.report())}

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Each strategy applies itself in phase order; then exactly their own parameters train."""
        for s in self.items:
            model = s.apply(model)
        self.components = mark_trainable(model, self.items)
        return model

    def own_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for s in self.items if self._trains(s) for _, p in s.own_parameters(model)]

    def describe(self, model: torch.nn.Module) -> list[str]:
        return [line for s in self.items if (line := s.describe(model))]

    # -- training -----------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, ctx: Any) -> None:
        for s in self._with(SetUp):
            s.prepare(model, ctx)

    def training_features(self, features: list[dict], ctx: Any) -> list[dict]:
        for s in self._with(DataHook):
            features = s.training_features(features, ctx)
        return features

    def on_task_end(self, model: torch.nn.Module, ctx: Any) -> None:
        for s in self._with(SetUp):
            s.on_task_end(model, ctx)

    def callbacks(self) -> list:
        return [c for s in self._with(Scheduled) for c in s.callbacks()]

    def rates(self, training_lr: float | None) -> dict[str, float]:
        """The one place a learning rate is decided: for each training component, in application order, its
        own ``lr`` option, else ``training.lr`` (``training_lr``, None when unset), else its ``default_lr``.
        Every optimizer group, Trainer's single rate and the summary's ``learning_rate`` come from this."""
        return {s.name: s.config.lr or training_lr or s.default_lr for s in self.items if self._trains(s)}

    def param_groups(self, model: torch.nn.Module, rates: dict[str, float]) -> list[dict[str, Any]]:
        """Every training component's optimizer groups, each from its rate in ``rates`` (:meth:`rates`)."""
        return [g for s in self.items if s.name in rates for g in s.param_groups(model, rates[s.name])]

    def learning_rates(self, model: torch.nn.Module, rates: dict[str, float]) -> dict[str, float]:
        """Each training component's peak rate (its first group's)."""
        out = {}
        for s in self.items:
            groups = s.param_groups(model, rates[s.name]) if s.name in rates else []
            if groups:
                out[s.name] = groups[0]["lr"]
        return out

    def training_loss(self, model, inputs, outputs, task_loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``w · task loss + Σ terms`` and the named parts (``task``, ``<strategy>/<term>``)."""
        parts = {"task": task_loss}
        terms = self._terms
        weight = math.prod(s.task_loss_weight() for s in terms)
        loss = weight * task_loss if weight != 1.0 else task_loss
        for s in terms:
            for name, value in s.loss_terms(model, inputs, outputs).items():
                parts[f"{s.name}/{name}"] = value
                loss = loss + value
        return loss, parts

    # -- the base model's outputs ---------------------------------------------------------------------
    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Every strategy's additions switched off. For a stack that changes base weights this gives the
        base model only before training; after it, use a frozen copy (tunelab.forgetting.Reference)."""
        trainable = [p.requires_grad for p in model.parameters()]
        try:
            with ExitStack() as stack:
                for s in self.items:
                    stack.enter_context(s.disabled(model))
                yield model
        finally:
            # as found: switching PEFT's layers back on marks only the active adapter's weights trainable,
            # which would leave the main process (that scores before training) with fewer trained weights
            # than the others
            for p, was in zip(model.parameters(), trainable, strict=True):
                p.requires_grad_(was)

    # -- the artefact -------------------------------------------------------------------------------
    def component_dir(self, model_dir: Path, strategy: Strategy, per_component: bool = False) -> Path:
        """A single strategy's artefact is the model dir itself (e.g. a plain PEFT adapter dir); in a hybrid,
        or with ``per_component``, each component that saves something gets a sub-directory named after it."""
        return model_dir if len(self._savers) <= 1 and not per_component else model_dir / strategy.name

    def save(self, model: torch.nn.Module, out_dir: Path, *, per_component: bool = False) -> None:
        """Each component's artefact under ``out_dir`` (in ``out_dir/<name>/`` with ``per_component``)."""
        for s in self._savers:
            s.save(model, self.component_dir(out_dir, s, per_component))

    def load(
        self, base_model: Callable[[], torch.nn.Module], model_dir: Path, *, per_component: bool = False
    ) -> torch.nn.Module:
        """The trained model from ``model_dir`` (as :meth:`save` wrote it): the saved standalone model, or
        ``base_model()`` with each component put back in application order."""
        if self.standalone:
            return type(self._savers[0]).load(None, self.component_dir(model_dir, self._savers[0], per_component))
        model = base_model()  # with nothing saved (a prompting baseline), the base model itself
        for s in self.items:
            model = type(s).load(model, self.component_dir(model_dir, s, per_component))
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.not_mergeable:
            raise StrategyError(
                f"{', '.join(self.not_mergeable)} cannot be folded into the weights (they add modules or virtual "
                "tokens); serve the run with its base model instead"
            )
        for s in reversed(self.items):
            model = s.merge(model)
        return model


def checks_model(configs: list[StrategyConfig]) -> bool:
    """Some component checks its options against the model's blocks (:meth:`Measured.fits`)."""
    return any(issubclass(get_strategy(c.name), Measured) for c in configs)


def model_problems(configs: list[StrategyConfig], model_dir: Path) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for each option of a component that does not fit the model in ``model_dir``
    (:meth:`Measured.fits`), the model built from its config.json on the meta device: no weight is read."""
    checked = [(i, c, cls) for i, c in enumerate(configs) if issubclass(cls := get_strategy(c.name), Measured)]
    if not checked:
        return []
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    problems: list[tuple[tuple, str]] = []
    try:
        n = len(transformer_blocks(model))
    except StrategyError as e:
        return [(("strategy", i), f"{c.name} needs transformer blocks: {e}") for i, c, _ in checked]
    for i, c, cls in checked:
        try:
            cls.fits(c, n)
        except ValueError as e:
            key, _, msg = str(e).partition(": ")
            problems.append((("strategy", i, key), msg))
    return problems
