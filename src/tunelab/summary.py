"""``summary.json``: one documented, versioned schema that every run mode fills (docs/summary.md).

Every summary is validated against :class:`Summary` before it is written, so a mode cannot write a key the
schema (and its documentation) does not know. A change to the schema that a reader would notice (a key
removed, renamed or retyped) raises :data:`SUMMARY_VERSION`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.errors import RunError
from tunelab.rundir import CONFIG, MODEL, SUMMARY
from tunelab.runtime import peak_memory_mb, write_json_atomic

SUMMARY_VERSION = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: one row of a run's headline scores: what was scored, before training, after it
Score = tuple[str, float | None, float | None]


def numbers(d: dict[str, Any] | None) -> dict[str, float]:
    """The numeric entries of a scores mapping (booleans and text left out)."""
    return {k: v for k, v in (d or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Parameters(_Section):
    trainable: int
    total: int
    trainable_pct: float
    components: dict[str, int]  #: trainable parameters per training strategy


class TrainStats(_Section):
    steps: int
    epochs: float
    train_loss: float
    rows: int  #: training rows after the strategies' data hooks (replay adds rows)
    tokens_seen: int  #: non-padding tokens
    tokens_per_s: float
    train_time_s: float
    resumed_from: str | None
    skipped_checkpoints: list[str]
    learning_rate: dict[str, float]  #: peak rate per training component
    streamed: bool = False  #: read from the file as it trained (data.streaming)


class TaskTrainStats(TrainStats):
    task: str


class Levers(_Section):
    """The speed and memory levers as resolved for the run (tunelab.levers)."""

    attention: str
    attention_probs: Literal["recompute", "keep"] = "keep"  #: absent from summaries written before the lever
    base_quantization: Literal["none", "4bit", "8bit"]
    loss_head: Literal["full", "positions"]
    frozen_weights: Literal["fp32", "bf16"]
    optimizer_impl: Literal["fused", "foreach", "for_loop"]
    compile: Literal["on", "off"] = "off"  #: absent from summaries written before the lever existed
    allocator: Literal["reuse", "system"] = "system"  #: absent from summaries written before the lever existed
    #: the C allocator that served the run (tunelab.malloc); absent from summaries written before it was recorded
    malloc: Literal["tcmalloc", "jemalloc", "mimalloc", "glibc", "system"] = "glibc"
    pad_to: Literal["bucket", "longest"] = "longest"  #: absent from summaries written before the lever existed
    weight_casts: Literal["recompute", "keep"] = "keep"  #: absent from summaries written before the lever
    activations: Literal["lean", "keep"] = "keep"  #: absent from summaries written before the lever
    lora_kernel: Literal["fused", "peft"] = "peft"  #: absent from summaries written before the lever
    threads: int
    why: dict[str, str]  #: for each ``auto`` lever left off, the reason


class Memory(_Section):
    peak_mb: float
    kind: Literal["cpu_peak_rss", "cuda_max_allocated"]


class ContinualSection(_Section):
    """``continual``: the tasks in order, the accuracy matrix (row i: every task's score after task i) and
    its metrics (tunelab.modes.continual.continual_metrics)."""

    tasks: list[str]
    metric: str
    before: list[float]  #: every task's score before training
    matrix: list[list[float]]
    average_accuracy: float
    backward_transfer: float | None = None  #: absent with a single task
    forgetting: float | None = None
    forgetting_max: float | None = None
    per_task_adapter: bool

    def headline(self) -> list[Score]:
        """Each task's score before the sequence and at its end."""
        final = self.matrix[-1] if self.matrix else [None] * len(self.tasks)
        return [(f"{t}: {self.metric}", b, a) for t, b, a in zip(self.tasks, self.before, final, strict=True)]


class MultitaskSection(_Section):
    """``multitask``: how the tasks were mixed and each task's scores before and after."""

    tasks: list[str]
    sampling: Literal["proportional", "uniform", "temperature", "round_robin"]
    temperature: float | None  #: only with sampling: temperature
    probabilities: dict[str, float] | None  #: each task's share of batches (round_robin: none)
    weights: dict[str, float]
    train_rows: dict[str, int]
    labels: dict[str, list[str] | None]
    per_task_parts: bool
    eval_before: dict[str, Any] | None
    eval: dict[str, Any]
    metric: str
    mean_score: float

    def headline(self) -> list[Score]:
        """Each task's headline metric before and after training, then their mean after."""
        from tunelab.evaluate import headline

        rows: list[Score] = []
        for t in self.tasks:
            after, before = headline(self.eval.get(t) or {}), headline((self.eval_before or {}).get(t) or {})
            what = after[0] if after else self.metric
            rows.append((f"{t}: {what}", float(before[1]) if before else None, float(after[1]) if after else None))
        return [*rows, (f"mean {self.metric}", None, self.mean_score)]


class Summary(_Section):
    summary_version: Literal[2]
    mode: Literal["single", "continual", "multitask"]
    strategy: list[str]
    model: str
    device: str
    precision: str
    world_size: int
    #: how the processes shared the training (training.distributed as resolved)
    distributed: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    levers: Levers | None = None  #: absent for baselines that load no training session
    parameters: Parameters
    #: what components decided, by name (layerwise select: auto: the scores, the chosen blocks and why)
    strategies: dict[str, dict[str, Any]] | None = None
    data: dict[str, Any] | None = None  #: single: format, labels, train/eval row counts
    #: single, multitask: one fit; continual: one per task; absent for a prompting baseline (nothing trains)
    train: TrainStats | list[TaskTrainStats] | None = None
    eval_before: dict[str, Any] | None = None  #: scores of the untouched model (eval.before)
    eval: dict[str, Any] | None = None  #: scores after training (tunelab.evaluate.score)
    forgetting: dict[str, Any] | None = None  #: before / after / delta on the retention set, original tasks
    continual: ContinualSection | None = None  #: the accuracy matrix and ACC / BWT / forgetting
    multitask: MultitaskSection | None = None  #: tasks, sampling, weights, per-task scores before/after
    memory: Memory
    wall_time_s: float
    outputs: dict[str, str]  #: paths of what the run wrote

    def headline(self) -> list[Score]:
        """The run's scores as a model card or report shows them: the mode's own typed section's, when its
        mode has one (continual, multitask), else every eval metric before and after."""
        section = getattr(self, self.mode, None)
        if section is not None:
            return section.headline()
        before, after = numbers(self.eval_before), numbers(self.eval)
        return [(k, before.get(k), v) for k, v in after.items()]


def finish_summary(summary: dict[str, Any], device: str, run_dir: Path, t_start: float, **outputs: Path) -> dict:
    """Version, peak memory, wall time and output paths; validated; ``summary.json`` written atomically."""
    summary = {"summary_version": SUMMARY_VERSION, **summary}
    summary["memory"] = peak_memory_mb(device)
    summary["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    paths = {"run_dir": run_dir, "model": run_dir / MODEL, "config": run_dir / CONFIG, **outputs}
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    try:
        Summary.model_validate(summary)
    except ValidationError as e:  # a bug in a mode, not a user error: say which key
        raise RunError(f"internal: summary.json does not fit its schema: {e.errors()[0]}") from None
    write_json_atomic(run_dir / SUMMARY, summary)
    return summary
