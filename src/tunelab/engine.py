"""The training engine: ``transformers.Trainer``, subclassed at three points.

Why Trainer rather than a loop on ``accelerate``: it already gives, tested by many users, gradient
accumulation, LR schedules, mixed precision on CPU and CUDA, resumable checkpoints (model, optimizer,
scheduler, RNG and data position), DDP under ``torchrun`` (gloo on CPU), length-grouped sampling and
TensorBoard logging. tunelab needs to change only what strategies decide (docs/design.md):

- ``create_optimizer``: parameter groups (and their learning rates) come from the strategies;
- ``compute_loss``: the task loss plus every strategy's extra loss terms, summed without knowing them;
- callbacks: a progress bar showing loss and tokens/s, and ``metrics.jsonl`` in the run dir.

The engine never names a strategy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback


class TunelabTrainer(Trainer):
    def __init__(self, *args, strategies=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.strategies = list(strategies)
        self._last_terms: dict[str, float] = {}

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            # As Trainer does: no weight decay on biases and norm weights.
            decay = set(self.get_decay_parameter_names(model))
            names = {id(p): n for n, p in model.named_parameters()}
            groups, seen = [], set()
            for s in self.strategies:
                for g in s.param_groups(model, self.args.learning_rate):
                    ids = {id(p) for p in g["params"]}
                    if ids & seen:
                        raise ValueError(f"parameter group '{g.get('name')}' repeats parameters of another group")
                    seen |= ids
                    opts = {k: v for k, v in g.items() if k not in ("params", "name")}
                    for wd, keep in ((self.args.weight_decay, True), (0.0, False)):
                        params = [p for p in g["params"] if (names.get(id(p)) in decay) == keep]
                        if params:
                            groups.append({**opts, "params": params, "weight_decay": wd})
            if not seen:
                raise ValueError("no parameter trains: the strategy left every parameter frozen")
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        terms = {}
        for s in self.strategies:
            for name, value in s.loss_terms(model, inputs, outputs).items():
                terms[f"{s.name}/{name}"] = value
                loss = loss + value
        self._last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({f"loss_terms/{k}": v for k, v in self._last_terms.items()})
        super().log(logs, start_time)


class Throughput:
    """Tokens per second over the current process's training time (restarts at resume)."""

    def __init__(self):
        self.t0: float | None = None
        self.tokens0 = 0

    def start(self, state) -> None:
        self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def rate(self, state) -> float:
        if self.t0 is None:
            return 0.0
        dt = time.perf_counter() - self.t0
        return (state.num_input_tokens_seen - self.tokens0) / dt if dt > 0 else 0.0


class BarCallback(ProgressCallback):
    """tqdm bar (steps, ETA) whose postfix shows the latest loss and tokens/s instead of printing dicts."""

    def __init__(self, throughput: Throughput):
        super().__init__()
        self.throughput = throughput

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None and state.global_step:
            self.training_bar.update(state.global_step)
            self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{self.throughput.rate(state):.0f}")


class MetricsCallback(TrainerCallback):
    """Appends every log event as one JSON line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, throughput: Throughput):
        self.path = path
        self.throughput = throughput

    def on_train_begin(self, args, state, control, **kwargs):
        self.throughput.start(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float | str)})
        record["tokens_seen"] = state.num_input_tokens_seen
        record["tokens_per_s"] = round(self.throughput.rate(state), 2)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
