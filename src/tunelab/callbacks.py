"""The Trainer callbacks every training run has: the progress bar (loss and tokens/s), ``metrics.jsonl`` in
the run dir, the throughput both read, the token budget (``training.max_tokens``), TensorBoard, and
:func:`attach`, which puts them (and the stack's and the mode's own) on a trainer in place of Trainer's
printer and bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from tunelab.progress import enabled as progress_enabled


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


class TokenBudget(TrainerCallback):
    """Stops training at the first optimizer step that brings the tokens seen (non-padding, all processes:
    the Trainer gathers them) to ``training.max_tokens``. The count is in the checkpoint's trainer state, so a
    resumed run stops at the same step."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def on_step_end(self, args, state, control, **kwargs):
        if state.num_input_tokens_seen >= self.max_tokens:
            control.should_training_stop = True

    on_train_begin = on_step_end  # resumed from the budget's last step: no step more


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


def attach(trainer, out_dir: Path, training, throughput: Throughput, schedules: list, extra: list) -> None:
    """Replace the Trainer's bar and printer by tunelab's bar and ``out_dir/metrics.jsonl`` (the printer prints
    every log as a dict; the Trainer takes it instead of its bar when tqdm is off, as under -q), and add
    TensorBoard (into ``out_dir/tb``) when ``training.report_to`` names it, the strategies' ``schedules``,
    the token budget, and the mode's ``extra``, in that order."""
    from transformers.integrations import TensorBoardCallback

    from tunelab.rundir import METRICS

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    tb = TensorBoardCallback()
    tb.logging_dir = str(out_dir / "tb")
    for cb in [
        *([BarCallback(throughput)] if progress_enabled() else []),
        MetricsCallback(out_dir / METRICS, throughput),
        *([tb] if "tensorboard" in training.report_to else []),
        *schedules,
        *([TokenBudget(training.max_tokens)] if training.max_tokens else []),
        *extra,
    ]:
        trainer.add_callback(cb)
