"""The optional capabilities of a strategy: typed protocols that the stack discovers by asking each component
``isinstance(s, Capability)``. A strategy has one by implementing its methods; subclassing the protocol (as
every built-in strategy does) also gives the defaults written here. The core contract every strategy keeps
is :class:`tunelab.strategies.base.Strategy`; docs/design.md has the whole contract on one page.

- :class:`LossTerm`: extra loss terms in every training step, and a factor on the task loss (EWC, L2-SP,
  retention, distillation, heads);
- :class:`SetUp`: set-up once the trainable set is known, and after each continual task (EWC, L2-SP,
  retention, distillation);
- :class:`DataHook`: the tokenized training rows before training (replay);
- :class:`Scheduled`: Trainer callbacks that change training as it runs (layer-wise unfreezing, L2);
- :class:`TaskRouter`: multi-task runs, the task names, then a task to route to (per-task PEFT, adapters,
  heads; :class:`PerTask` is their shared part);
- :class:`Classifier`: class logits instead of generating, when scoring (heads);
- :class:`Mergeable`: ``tunelab merge`` folds it into plain weights (LoRA, IA3, layer-wise, regularizers);
- :class:`Baseline`: no training; the untouched model is scored with these prompts (prompting);
- :class:`ShardingLimits`: why it cannot train under DDP, FSDP or DeepSpeed, refused at validation
  (layer-wise, L2, L2-SP, EWC, distillation, PEFT, heads);
- :class:`Measured`: chooses what trains from a measurement of the blocks taken before ``apply``, and
  checks its options against the model's block count before loading (layer-wise ``select: auto``, LISA);
- :class:`Reports`: what it decided, for ``summary.json`` (layer-wise: the scores, the chosen blocks, why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from tunelab.data import Shots


@runtime_checkable
class LossTerm(Protocol):
    """Adds terms to the loss of training steps (never to ``eval_loss``)."""

    def loss_terms(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Terms added to the loss of **training** steps only, each logged as ``loss_terms/<strategy>/<name>``
        beside ``loss_terms/task``."""
        ...

    def task_loss_weight(self) -> float:
        """Factor on the task loss in training steps (distillation: ``α`` in ``α·CE + (1-α)·KL``)."""
        return 1.0


@runtime_checkable
class SetUp(Protocol):
    """Set-up that needs the trained model: before training, and after each task of a continual run."""

    def prepare(self, model: torch.nn.Module, ctx: Any) -> None:
        """Called once the trainable set is known, before training (EWC estimates its Fisher here). ``ctx``
        is a :class:`tunelab.context.RunContext`: tokenizer, device, retention set, base reference, ..."""

    def on_task_end(self, model: torch.nn.Module, ctx: Any) -> None:
        """Continual learning: called after each task (online EWC accumulates its Fisher here)."""


@runtime_checkable
class DataHook(Protocol):
    """Changes the training rows."""

    def training_features(self, features: list[dict], ctx: Any) -> list[dict]:
        """The tokenized training rows, as they will train (replay mixes in earlier examples here)."""
        ...


@runtime_checkable
class Scheduled(Protocol):
    """Changes training as it runs, through Trainer callbacks."""

    def callbacks(self) -> list:
        """``TrainerCallback`` objects (gradual unfreezing's stages, L2's decay)."""
        ...


@runtime_checkable
class TaskRouter(Protocol):
    """Keeps parts per task in a multi-task run (``per_task``), and routes the model to one of them."""

    def set_tasks(self, names: list[str], labels: dict[str, list[str] | None]) -> None:
        """The task names and label sets, before ``apply``: a per-task component builds a copy per task."""
        ...

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        """Route ``model`` to task ``name``'s parts, acting on the model alone (so a model read back from
        disk routes the same way)."""
        ...


class PerTask(TaskRouter):
    """What every task router shares: the task names and label sets it was given, and ``per_task`` (its
    option: one copy per task, else one shared copy that routing leaves alone)."""

    tasks: list[str] = []
    task_labels: dict[str, list[str] | None] = {}

    @property
    def per_task(self) -> bool:
        return bool(getattr(self.config, "per_task", False))

    def set_tasks(self, names: list[str], labels: dict[str, list[str] | None]) -> None:
        self.tasks, self.task_labels = list(names), dict(labels)

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        """A shared copy routes nothing; per-task strategies override this."""


@runtime_checkable
class Classifier(Protocol):
    """Scores prompts as classes, without generating."""

    def classify(self, model, input_ids, attention_mask, bf16: bool) -> torch.Tensor | None:
        """Class logits ``[B, labels]`` for prompts (None when the model holds no head for them)."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    """Folds into plain weights (``tunelab merge``): the merged model needs no tunelab and no PEFT."""

    def merge(self, model: torch.nn.Module) -> torch.nn.Module: ...


@runtime_checkable
class Baseline(Protocol):
    """Scores the untouched model instead of training (no training run, no artefact)."""

    @classmethod
    def prompt_examples(cls, config: Any) -> Shots:
        """The training rows shown, as solved examples, before every scored prompt, and the instruction it
        is scored with (:class:`tunelab.data.Shots`)."""
        ...


@runtime_checkable
class ShardingLimits(Protocol):
    """Cannot train in several processes under some ``training.distributed`` modes."""

    @classmethod
    def distributed_problem(cls, config: Any, mode: str) -> str | None:
        """Why this strategy cannot train under ``mode`` (``ddp``, ``fsdp``, ``deepspeed``), or None. DDP
        runs the model's forward in each process and averages gradients in its backward; FSDP and DeepSpeed
        ZeRO-3 also replace the model's parameters with shards while it trains."""
        ...


@runtime_checkable
class Measured(Protocol):
    """Chooses what trains from how much each block matters for the task (:mod:`tunelab.layers`)."""

    def estimators(self) -> tuple[str, ...]:
        """The measurements it needs taken on the untouched model before ``apply`` (empty: none, e.g. it was
        given a measurement file); the run asks for them with ``Need.LAYER_SCORES``."""
        ...

    def measured(self, scores: Any) -> None:
        """The measurement (:class:`tunelab.layers.LayerScores`), before ``apply``."""
        ...

    @classmethod
    def fits(cls, config: Any, n_blocks: int) -> None:
        """Refuse, with a ValueError naming the option, options that cannot fit a model of ``n_blocks``
        blocks; called before the model loads (from its config alone), and by ``tunelab validate``."""
        ...


@runtime_checkable
class Reports(Protocol):
    """Has decisions worth keeping in ``summary.json`` (under ``strategies.<name>``)."""

    def report(self) -> dict[str, Any]: ...
