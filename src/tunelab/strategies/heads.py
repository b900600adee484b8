"""Classification heads per task over the shared body (mode: multitask), the classic hard-parameter-sharing
set-up (Caruana, 1997; Ruder, 2017, "An Overview of Multi-Task Learning in Deep Neural Networks", §3):
every task with classification rows (``text`` + ``label``) gets its own linear head, ``W_t h + b_t`` with
``h`` the model's final hidden state (the input of its output layer) at the last prompt token and one output
per label of the task's training set.

Each training batch of such a task adds ``weight · CE(head_t(h), class)`` to the loss, beside the language
modelling loss that generating the label gives; the body (whatever trains it: LoRA, adapters, layer-wise,
full is not combinable) learns from both. Scoring a classification task adds ``head_accuracy``: the share of
eval rows whose head's argmax is the reference label, with no generation at all — the head is a
classifier that needs one forward pass per row. Tasks with other row shapes have no head.

Saved as ``heads.safetensors`` (every task's ``weight``/``bias``) + ``heads.json`` (each task's label set);
reloaded onto a fresh base and routed with ``--task`` like every per-task part.

When to choose it: classification tasks in a multi-task run where a calibrated label distribution (the head's
softmax) or a single forward pass per prediction matters more than answering in text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from tunelab.evaluate import autocast
from tunelab.strategies.base import PerTaskConfig, Strategy, StrategyError, register_strategy, unwrap
from tunelab.strategies.capabilities import Classifier, LossTerm, PerTask, ShardingLimits

WEIGHTS_FILE, META_FILE = "heads.safetensors", "heads.json"


class HeadsConfig(PerTaskConfig):
    per_task: bool = Field(True, description="Always true: one head per classification task.")
    weight: float = Field(1.0, gt=0, description="Weight of the heads' cross-entropy in the training loss.")

    @field_validator("per_task")
    @classmethod
    def _always(cls, v: bool) -> bool:
        if not v:
            raise ValueError("heads are one per task (mode: multitask); per_task cannot be false")
        return v


class TaskHeads(torch.nn.Module):
    """One linear head per classification task, reading the hidden state the output layer reads."""

    def __init__(self, hidden: int, labels: dict[str, list[str]]):
        super().__init__()
        self.labels = labels
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(hidden, len(ls)) for t, ls in labels.items()})
        self.active: str | None = None
        self.hidden: torch.Tensor | None = None  # the output layer's input in the latest forward

    def capture(self, module, args) -> None:
        self.hidden = args[0]

    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The active task's head on the captured hidden state at ``positions`` (one per row, counted from
        the end of the sequence so that virtual tokens a prompt learner prepends do not shift them)."""
        h = self.hidden
        rows = torch.arange(h.shape[0], device=h.device)
        return self.heads[self.active](h[rows, positions].to(self.heads[self.active].weight.dtype))


def attach(model: torch.nn.Module, labels: dict[str, list[str]]) -> TaskHeads:
    inner = unwrap(model)
    heads = TaskHeads(inner.config.hidden_size, labels).to(inner.get_output_embeddings().weight.device)
    inner.add_module("task_heads", heads)
    inner.get_output_embeddings().register_forward_pre_hook(heads.capture)
    return heads


def _find(model: torch.nn.Module) -> TaskHeads | None:
    return next((m for m in model.modules() if isinstance(m, TaskHeads)), None)


def _last_prompt_positions(labels: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the position (from the end of a ``width``-long sequence) of the last prompt token: the one
    that predicts the first label token."""
    first = (labels != -100).int().argmax(-1)
    return width - labels.shape[1] + first - 1


@register_strategy
class Heads(Strategy, PerTask, LossTerm, Classifier, ShardingLimits):
    name = "heads"
    summary = "One classification head per task on the shared body (mode: multitask); scored without generating."
    Config = HeadsConfig
    default_lr = 1e-3

    @classmethod
    def distributed_problem(cls, config, mode):
        if mode == "ddp":
            # measured: DDP's reducer, "Expected to mark a variable ready only once"
            return (
                "its loss applies the heads to hidden states after the model's forward pass, outside what DDP "
                "synchronises (use fsdp)"
            )
        return None

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        labels = {t: ls for t, ls in self.task_labels.items() if ls}
        if not labels:
            raise StrategyError("heads: no task has classification rows (text + label); a head needs a label set")
        self.heads = attach(model, labels)
        return model

    def own_parameters(self, model):
        return [(f"task_heads.{n}", p) for n, p in self.heads.named_parameters()]

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        heads = _find(model)
        if heads is not None:
            heads.active = name if name in heads.heads else None

    def loss_terms(self, model, inputs, outputs):
        heads, classes = self.heads, inputs.get("class")
        if heads.active is None or classes is None or not bool((classes >= 0).any()):
            return {}
        positions = _last_prompt_positions(inputs["labels"], heads.hidden.shape[1])
        logits = heads.logits_at(positions)
        return {"ce": self.config.weight * F.cross_entropy(logits[classes >= 0], classes[classes >= 0])}

    def classify(self, model, input_ids, attention_mask, bf16: bool) -> torch.Tensor | None:
        heads = _find(model)
        if heads is None or heads.active is None:
            return None
        with torch.no_grad(), autocast(input_ids.device, bf16):
            model(input_ids=input_ids, attention_mask=attention_mask)
        last = attention_mask.sum(-1) - 1 + heads.hidden.shape[1] - input_ids.shape[1]
        return heads.logits_at(last).float()

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in self.heads.heads.named_parameters()},
            out_dir / WEIGHTS_FILE,
        )
        meta = {"labels": self.heads.labels, "hidden": self.heads.heads[next(iter(self.heads.labels))].in_features}
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        meta = json.loads((out_dir / META_FILE).read_text())
        heads = attach(base_model, meta["labels"])
        tensors = load_file(out_dir / WEIGHTS_FILE)
        heads.heads.load_state_dict(tensors)
        return base_model
