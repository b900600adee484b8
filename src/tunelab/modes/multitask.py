"""``mode: multitask``: several named tasks trained together in one run, over one shared body.

Each task (``tasks: [{name, train, eval, weight}, ...]``) has its own files and row shape (prompt/completion,
chat, classification or text). Batches are homogeneous: every batch holds rows of one task, and carries
that task to the engine, which routes the model to the task's own parts (strategies with ``per_task: true``:
one PEFT adapter or one bottleneck adapter per task) and multiplies the task loss by the task's ``weight``.
Which task each batch comes from (``multitask.sampling``), with ``n_i`` the rows of task i:

- ``proportional``: p_i = n_i / Σ n (every row equally likely: the concatenated data, batched by task);
- ``uniform``: p_i = 1 / K;
- ``temperature``: p_i ∝ n_i^(1/T) (Arivazhagan et al., 2019, "Massively Multilingual NMT"): T = 1 is
  proportional, T → ∞ uniform; small tasks are seen more often without dominating;
- ``round_robin``: tasks in turn, one batch each.

An epoch is Σ n rows. The order depends only on (seed, epoch), so a resume sees the batches the
uninterrupted run saw; within a task, rows are drawn from a shuffled pass over its rows, reshuffled when
used up (a small task sampled often repeats rows, as in any up-sampling).

Reported per task: the training loss (``loss/<task>`` in metrics.jsonl and TensorBoard), the eval loss
during training when ``training.eval_steps`` is set (``eval_<task>_loss``), and after training each task's
scores on its eval set with its own parts (loss, perplexity, exact match or accuracy): ``summary.json`` →
``multitask.eval.<task>``, a ``task_eval`` line per task in metrics.jsonl, and ``eval/<task>/<metric>`` in
TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import torch

from tunelab.artefacts import save_artefact
from tunelab.data import Prepared
from tunelab.evaluate import headline
from tunelab.fitter import fit
from tunelab.forgetting import forgetting_summary
from tunelab.modes.base import RunMode
from tunelab.rundir import METRICS, MODEL
from tunelab.summary import finish_summary


def task_probabilities(sizes: list[int], sampling: str, temperature: float) -> list[float] | None:
    """Each task's probability of giving the next batch; None for round robin (tasks in turn)."""
    if sampling == "round_robin":
        return None
    if sampling == "uniform":
        weights = [1.0] * len(sizes)
    elif sampling == "proportional":
        weights = [float(n) for n in sizes]
    elif sampling == "temperature":
        weights = [n ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(sampling)
    total = sum(weights)
    return [w / total for w in weights]


class TaskMixSampler(torch.utils.data.Sampler):
    """Row indices in homogeneous batches of ``batch_size``: each batch's task drawn as configured, its rows
    taken from a shuffled pass over the task's rows; seeded with ``seed + epoch``."""

    def __init__(self, task_of_row: list[int], batch_size: int, probabilities: list[float] | None, seed: int):
        self.batch_size, self.probabilities, self.seed, self.epoch = batch_size, probabilities, seed, 0
        self.rows: list[list[int]] = []
        for i, t in enumerate(task_of_row):
            while len(self.rows) <= t:
                self.rows.append([])
            self.rows[t].append(i)
        self.batches = math.ceil(len(task_of_row) / batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def task_order(self, g: torch.Generator) -> list[int]:
        if self.probabilities is None:
            return [b % len(self.rows) for b in range(self.batches)]
        p = torch.tensor(self.probabilities, dtype=torch.float64)
        return torch.multinomial(p, self.batches, replacement=True, generator=g).tolist()

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.task_order(g)
        passes: list[list[int]] = [[] for _ in self.rows]
        out = []
        for t in order:
            for _ in range(self.batch_size):
                if not passes[t]:
                    perm = torch.randperm(len(self.rows[t]), generator=g).tolist()
                    passes[t] = [self.rows[t][i] for i in reversed(perm)]
                out.append(passes[t].pop())
        return iter(out)


def _tagged(prepared: Prepared, task: int) -> Prepared:
    return dataclasses.replace(prepared, features=[{**f, "task": task} for f in prepared.features])


class MultitaskRun(RunMode):
    name = "multitask"

    @classmethod
    def labels(cls, s: dict[str, Any], task: str | None = None) -> list[str] | None:
        return (s["multitask"].get("labels") or {}).get(task) if task is not None else None

    @classmethod
    def task_lines(cls, s: dict[str, Any]) -> list[str]:
        m, lines = s["multitask"], []
        for name, sc in m["eval"].items():
            metric, value = headline(sc)
            before = f" (before: {headline(m['eval_before'][name])[1]:.3f})" if m["eval_before"] else ""
            lines.append(f"task {name}: eval loss {sc['loss']:.4f}, {metric} {value:.3f}{before}")
        return lines

    @classmethod
    def row_score(cls, s: dict[str, Any], task: str | None = None) -> tuple[str | None, float | None]:
        m = s["multitask"]
        if task is not None:
            return super().row_score({"eval": m["eval"][task]})
        return m["metric"], m["mean_score"]

    def prepare_data(self) -> None:
        s = self.session
        self.tasks = self.prepare_tasks()
        self.names = [t.name for t, _, _ in self.tasks]
        s.stack.set_tasks(self.names, {t.name: tr.labels for t, tr, _ in self.tasks})  # before the model loads
        self.originals = s.original_tasks()

    def score_tasks(self, base: bool = False) -> dict[str, dict[str, Any]]:
        """Each task's scores on its eval set, with the model routed to that task's parts."""
        s, out = self.session, {}
        for t, _, ev in self.tasks:
            s.stack.select_task(s.model, t.name)
            out[t.name] = s.score_base(ev) if base else s.score(ev, record=t.name)
        return out

    def train(self) -> None:
        s, cfg = self.session, self.cfg
        self.eval_before, self.before_retention = None, None
        if self.main:
            if cfg.eval.before:
                self.eval_before = self.score_tasks(base=True)
            self.before_retention = s.retention_before()
            self.score_originals_before()
        features, sizes = [], []
        for i, (_, tr, _) in enumerate(self.tasks):
            rows = s.stack.training_features(tr.features, s.ctx)  # replay mixes its rows into each task's
            features += [{**f, "task": i} for f in rows]
            sizes.append(len(rows))
        self.sizes = sizes
        self.probabilities = task_probabilities(sizes, cfg.multitask.sampling, cfg.multitask.temperature)

        def sampler(dataset, batch_size: int, seed: int) -> TaskMixSampler:
            return TaskMixSampler(dataset["task"], batch_size, self.probabilities, seed)

        evals = (
            {t.name: _tagged(ev, i) for i, (t, _, ev) in enumerate(self.tasks)}
            if cfg.training.eval_steps
            else None
        )
        self.stats = fit(
            s,
            features,
            evals,
            self.run_dir,
            resume=self.resume,
            callbacks=self.callbacks,
            data_hooks=False,
            sampler=sampler,
            tasks=self.names,
            task_weights=[t.weight for t, _, _ in self.tasks],
        )

    def log_scores(self, scores: dict[str, dict[str, Any]]) -> None:
        """Each task's final scores: one ``task_eval`` line per task in metrics.jsonl, and TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter

        step = self.stats["steps"]
        writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        with (self.run_dir / METRICS).open("a") as f:
            for name, sc in scores.items():
                values = {k: v for k, v in sc.items() if isinstance(v, int | float) and k != "examples"}
                f.write(
                    json.dumps({"step": step, "time": time.time(), "event": "task_eval", "task": name, **values})
                )
                f.write("\n")
                for k, v in values.items():
                    writer.add_scalar(f"eval/{name}/{k}", v, step)
        writer.close()

    def save(self) -> dict[str, Any]:
        s, cfg = self.session, self.cfg
        save_artefact(s.stack, s.model, s.tokenizer, self.run_dir / MODEL, (s.cfg.model, s.model_dir))
        scores = self.score_tasks()
        self.log_scores(scores)
        summary = s.summary_head(self.name)
        metric_values = [headline(sc) for sc in scores.values()]
        metrics = {m for m, _ in metric_values}
        probabilities = dict(zip(self.names, self.probabilities, strict=True)) if self.probabilities else None
        summary["multitask"] = {
            "tasks": self.names,
            "sampling": cfg.multitask.sampling,
            "temperature": cfg.multitask.temperature if cfg.multitask.sampling == "temperature" else None,
            "probabilities": probabilities,
            "weights": {t.name: t.weight for t, _, _ in self.tasks},
            "train_rows": dict(zip(self.names, self.sizes, strict=True)),
            "labels": {t.name: tr.labels for t, tr, _ in self.tasks},  # classification prompts list them
            "per_task_parts": s.stack.routes_tasks,
            "eval_before": self.eval_before,
            "eval": scores,
            "metric": metrics.pop() if len(metrics) == 1 else "score",
            "mean_score": sum(float(v) for _, v in metric_values) / len(metric_values),
        }
        summary["train"] = self.stats
        forgetting: dict[str, Any] = {}
        if s.stack.routes_tasks and self.before_retention is not None:  # each task's parts forget on their own
            forgetting["per_task"] = {}
            for name in self.names:
                s.stack.select_task(s.model, name)
                forgetting["per_task"][name] = forgetting_summary(self.before_retention, s.retention_after())
        elif (after := s.retention_after()) is not None:
            forgetting.update(forgetting_summary(self.before_retention, after))
        self.add_forgetting(summary, forgetting)
        return finish_summary(summary, s.device, self.run_dir, self.t_start)
