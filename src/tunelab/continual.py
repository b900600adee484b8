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
``continual.per_task_adapter: true`` — one fresh adapter (e.g. LoRA) per task on the frozen base, with each
task's evaluation routed to its own adapter (task identity known at test time), which cannot forget.

Writes ``continual.json`` and ``continual.png`` (a heatmap of the matrix) to the run dir, each task's
training logs under ``tasks/<i>-<name>/``, and the final artefact (per-task adapters under
``model/<task>/``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tunelab.data import prepare_splits
from tunelab.evaluate import headline, score
from tunelab.forgetting import forgetting_summary
from tunelab.run import (
    MODEL,
    RunError,
    RunResult,
    Session,
    finish_summary,
    guarded,
    is_main_process,
    save_artefact,
    write_json_atomic,
)
from tunelab.rundir import RunDir


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


def train_continual(cfg, *, overwrite: bool = False, callbacks: list | None = None) -> RunResult:
    t_start = time.perf_counter()
    main = is_main_process()
    session = Session(cfg, main)
    tasks = []
    for t in cfg.tasks:
        tr, ev = prepare_splits(t, session.tokenizer, cfg.training.max_length, cfg.training.seed)
        if not ev.scorable:
            raise RunError(f"task {t.name}: its eval rows have no references to score (accuracy / exact match)")
        tasks.append((t.name, tr, ev))
    claim = RunDir.claim(cfg.output_dir, resume=False, overwrite=overwrite) if main else None
    run_dir = Path(cfg.output_dir)
    with guarded(claim, cfg):
        session.load()
        if claim is not None:
            claim.begin(cfg.to_dict())
        summary = _run_tasks(session, cfg, tasks, run_dir, callbacks, t_start)
    return RunResult(run_dir, summary)


def _run_tasks(session: Session, cfg, tasks: list, run_dir: Path, callbacks, t_start: float) -> dict[str, Any]:
    main, names = session.main, [name for name, _, _ in tasks]
    routed = cfg.continual.per_task_adapter
    if routed and any(s.changes_base_weights for s in session.strategies):
        raise RunError(
            "continual.per_task_adapter needs strategies that add modules (lora, adapters, prefix ...); "
            f"{'+'.join(cfg.strategy_names())} changes base weights"
        )
    own = [p for s in session.strategies if s.trains for _, p in s.own_parameters(session.model)]
    initial = [p.detach().clone() for p in own]
    snapshots: list[list[torch.Tensor]] = []

    def load_values(values):
        with torch.no_grad():
            for p, v in zip(own, values, strict=True):
                p.copy_(v)

    metric_name = ["exact_match"]

    def evaluate_all(row_of: int | None) -> list[float]:
        row = []
        for j, (_, _, ev) in enumerate(tasks):
            if routed and row_of is not None:
                load_values(snapshots[j] if j < len(snapshots) else initial)  # route task j to its adapter
            metric_name[0], value = headline(score(session.model, session.tokenizer, ev, cfg.eval, session.bf16))
            row.append(float(value))
        if routed and row_of is not None:
            load_values(snapshots[-1])
        return row

    before_retention = session.retention_before() if main else None
    before_row = evaluate_all(None) if main else []
    matrix, stats = [], []
    for i, (name, tr, _) in enumerate(tasks):
        if routed:
            load_values(initial)  # a fresh adapter for every task
        task_dir = run_dir / "tasks" / f"{i}-{name}"
        task_dir.mkdir(parents=True, exist_ok=True)
        stats.append({"task": name, **session.fit(tr.features, None, task_dir, callbacks=callbacks)})
        session.ctx.task_features = tr.features
        for s in session.strategies:
            s.on_task_end(session.model, session.ctx)
        session.ctx.previous_features = session.ctx.previous_features + tr.features
        if routed:
            snapshots.append([p.detach().clone() for p in own])
        if main:
            matrix.append(evaluate_all(i))
            print(
                f"after task {name}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, matrix[-1], strict=True)),
                flush=True,
            )

    if not main:
        return {}
    metrics = continual_metrics(matrix)
    result = {
        "tasks": names,
        "metric": metric_name[0],
        "before": before_row,
        "matrix": matrix,
        **metrics,
        "per_task_adapter": routed,
        "train": stats,
    }
    write_json_atomic(run_dir / "continual.json", result)
    title = (
        f"{'+'.join(cfg.strategy_names())}{' (per-task adapters)' if routed else ''}: "
        f"ACC {metrics['average_accuracy']:.2f}, BWT {metrics.get('backward_transfer', 0):+.2f}"
    )
    heatmap(matrix, before_row, names, run_dir / "continual.png", title)

    if routed:
        from tunelab.fsutil import atomic_dir

        with atomic_dir(run_dir / MODEL) as tmp:
            for name, values in zip(names, snapshots, strict=True):
                load_values(values)
                for s in session.strategies:
                    if s.saves:
                        s.save(session.model, tmp / name / s.name)
            session.tokenizer.save_pretrained(tmp)
    else:
        save_artefact(session.strategies, session.model, session.tokenizer, run_dir / MODEL)
    summary: dict[str, Any] = {
        "strategy": cfg.strategy_names(),
        "model": str(session.model_dir),
        "parameters": session.parameters_summary(),
        "continual": {k: v for k, v in result.items() if k != "train"},
        "train": stats,
    }
    after = session.retention_after()
    if after is not None:
        summary["forgetting"] = forgetting_summary(before_retention, after)
    finish_summary(
        summary,
        session.device,
        run_dir,
        t_start,
        continual=run_dir / "continual.json",
        heatmap=run_dir / "continual.png",
    )
    return summary
