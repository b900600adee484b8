"""Continual learning: ``tasks: [a, b, c]`` trains on each task in order; after each one, every task's eval
set is scored, giving the accuracy matrix ``R[i][j]`` = score on task j after training through task i
(plus a row ``before`` for the untouched model).

Metrics (Avalanche's definitions; Lomonaco et al., 2021; Lopez-Paz & Ranzato, 2017 for BWT), T tasks:

- ``average_accuracy`` = (1/T) Σ_j R[T-1][j]
- ``backward_transfer`` = 1/(T-1) Σ_{j<T-1} (R[T-1][j] − R[j][j])   (negative = forgetting)
- ``forgetting`` = 1/(T-1) Σ_{j<T-1} (R[j][j] − R[T-1][j])   (Avalanche's experience forgetting: score right
  after learning a task minus the final score)
- ``forgetting_max`` = 1/(T-1) Σ_{j<T-1} (max_{l<T-1} R[l][j] − R[T-1][j])   (Chaudhry et al., 2018)

The score of a task is its headline metric (accuracy for classification, else exact match).

Methods are the strategies and regularizers: naive (just a strategy), ``ewc`` (online with ``gamma`` < 1),
``replay`` (earlier tasks' rows mixed in), ``retention`` (KL to the base), and
``continual.per_task_adapter: true`` — one fresh adapter (e.g. LoRA) per task on the frozen base, each task
trained and scored on its own (task identity known at test time), which cannot forget. It is the
strategies' own per-task mechanism, the one multi-task runs use (``per_task: true``, which the config sets
on every training component): the model is routed to a task's copy to train and to score it, and the
artefact holds every task's copy as a multi-task run's does (``--task`` picks one when it is read back).

Writes ``continual.json`` and ``continual.png`` (a heatmap of the matrix) to the run dir, each task's
training logs under ``tasks/<i>-<name>/``, and the final artefact under ``model/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.artefacts import save_artefact
from tunelab.evaluate import headline
from tunelab.fitter import fit
from tunelab.forgetting import forgetting_summary
from tunelab.modes.base import RunMode
from tunelab.rundir import MODEL
from tunelab.runtime import write_json_atomic
from tunelab.summary import finish_summary


def continual_metrics(matrix: list[list[float]]) -> dict[str, float]:
    t = len(matrix)
    final = matrix[-1]
    out = {"average_accuracy": sum(final) / t}
    if t > 1:
        prev = range(t - 1)
        out["backward_transfer"] = sum(final[j] - matrix[j][j] for j in prev) / (t - 1)
        out["forgetting"] = sum(matrix[j][j] - final[j] for j in prev) / (t - 1)
        out["forgetting_max"] = sum(max(matrix[k][j] for k in range(t - 1)) - final[j] for j in prev) / (t - 1)
    return out


def heatmap(matrix: list[list[float]], before: list[float], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [before, *matrix]
    labels = ["before", *[f"after {n}" for n in names]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated on task")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ContinualRun(RunMode):
    name = "continual"
    resumable = False  # a sequence restarts from its first task

    @classmethod
    def result_lines(cls, s: dict[str, Any]) -> list[str]:
        c = s["continual"]
        return [
            f"trained {'+'.join(s['strategy'])} on tasks {', '.join(c['tasks'])}: average {c['metric']} "
            f"{c['average_accuracy']:.3f}, backward transfer {c.get('backward_transfer', 0):+.3f}, "
            f"forgetting {c.get('forgetting', 0):.3f}",
            f"outputs: {s['outputs']['run_dir']} (continual.json, continual.png)",
        ]

    @classmethod
    def row_score(cls, s: dict[str, Any], task: str | None = None) -> tuple[str | None, float | None]:
        c = s["continual"]
        if task is not None:  # after the whole sequence
            return c["metric"], float(c["matrix"][-1][c["tasks"].index(task)])
        return f"average {c['metric']}", c["average_accuracy"]

    def prepare_data(self) -> None:
        prepared = self.prepare_tasks()
        self.tasks = [(t.name, tr, ev) for t, tr, ev in prepared]
        self.names = [name for name, _, _ in self.tasks]
        self.routed = self.cfg.continual.per_task_adapter
        if self.routed:  # the strategies' own copy per task (per_task, set by the config), as in multitask
            self.session.stack.set_tasks(self.names, {t.name: tr.labels for t, tr, _ in prepared})

    def _evaluate_all(self, current: str | None) -> list[float]:
        """Every task's headline score; routed, each task on its own copy (a task not yet trained: its
        untouched copy), and then back to ``current``'s."""
        s, row = self.session, []
        for name, _, ev in self.tasks:
            if self.routed:
                s.stack.select_task(s.model, name)
            # the rows scored after the last task stay in predictions/<task>.jsonl (earlier ones are replaced)
            self.metric, value = headline(s.score(ev, record=name))
            row.append(float(value))
        if self.routed and current is not None:
            s.stack.select_task(s.model, current)
        return row

    def train(self) -> None:
        s = self.session
        self.metric = "exact_match"
        self.before_retention = s.retention_before() if self.main else None
        self.before_row = self._evaluate_all(None) if self.main else []
        self.matrix, self.stats = [], []
        for i, (name, tr, _) in enumerate(self.tasks):
            if self.routed:
                s.stack.select_task(s.model, name)  # its own, untouched copy trains
            task_dir = self.run_dir / "tasks" / f"{i}-{name}"
            task_dir.mkdir(parents=True, exist_ok=True)
            self.stats.append({"task": name, **fit(s, tr.features, None, task_dir, callbacks=self.callbacks)})
            s.ctx.task_features = tr.features
            s.stack.on_task_end(s.model, s.ctx)
            s.ctx.previous_features = s.ctx.previous_features + tr.features
            if self.main:
                self.matrix.append(self._evaluate_all(name))
                scores = ", ".join(f"{n} {v:.3f}" for n, v in zip(self.names, self.matrix[-1], strict=True))
                print(f"after task {name}: {scores}", flush=True)

    def save(self) -> dict[str, Any]:
        s, cfg, run_dir = self.session, self.cfg, self.run_dir
        metrics = continual_metrics(self.matrix)
        result = {
            "tasks": self.names,
            "metric": self.metric,
            "before": self.before_row,
            "matrix": self.matrix,
            **metrics,
            "per_task_adapter": self.routed,
            "train": self.stats,
        }
        write_json_atomic(run_dir / "continual.json", result)
        title = (
            f"{'+'.join(cfg.strategy_names())}{' (per-task adapters)' if self.routed else ''}: "
            f"ACC {metrics['average_accuracy']:.2f}, BWT {metrics.get('backward_transfer', 0):+.2f}"
        )
        heatmap(self.matrix, self.before_row, self.names, run_dir / "continual.png", title)
        save_artefact(s.stack, s.model, s.tokenizer, run_dir / MODEL, (s.cfg.model, s.model_dir))
        summary = s.summary_head(self.name)
        summary["continual"] = {k: v for k, v in result.items() if k != "train"}
        summary["train"] = self.stats
        after = s.retention_after()
        if after is not None:
            summary["forgetting"] = forgetting_summary(self.before_retention, after)
        return finish_summary(
            summary,
            s.device,
            run_dir,
            self.t_start,
            continual=run_dir / "continual.json",
            heatmap=run_dir / "continual.png",
        )
