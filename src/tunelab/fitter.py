"""The fitter: one Trainer run over a loaded session's model. It maps the run's ``training`` options to
Trainer's ``TrainingArguments``, attaches the callbacks (tunelab.callbacks), resumes from the newest complete
checkpoint, and returns the training stats. Loading, scoring and the summary head stay with the session
(tunelab.session), which calls :func:`fit`.

The learning rate is resolved here, once per fit, by the stack (:meth:`StrategyStack.rates`: each training
component's own ``lr`` option, else ``training.lr``, else the component's default); the optimizer's groups,
TrainingArguments' single rate and the summary's ``learning_rate`` are all read from that one mapping.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab import distributed, levers, malloc
from tunelab.attention import recomputing
from tunelab.checkpoints import STAGING, Checkpoint, pick_resume_checkpoint
from tunelab.config import RunConfig
from tunelab.data import Collator, Prepared, eval_datasets, features_dataset, lengths
from tunelab.fsutil import write_text_atomic
from tunelab.lorakernel import fusing
from tunelab.rundir import CHECKPOINTS, METRICS
from tunelab.runtime import reusing_freed_memory, world_size
from tunelab.streaming import ESTIMATE_ROWS
from tunelab.trackers import scoped_env, tracker_env

if TYPE_CHECKING:
    from tunelab.callbacks import Throughput
    from tunelab.session import Session


def training_arguments(
    cfg: RunConfig,
    run_dir: Path,
    lr: float,
    precision: str,
    has_eval: bool,
    unused_parameters: bool = False,
    max_steps: int | None = None,
    sharding: str = "single",
    blocks: list[str] | None = None,
):
    """``unused_parameters``: some trained parameters sit out whole steps (per-task parts: only the batch's
    task's are used), which DDP must be told. ``max_steps``: the horizon, when it is not ``training.max_steps``
    (a budget in tokens: :func:`token_budget_steps`). ``sharding``: ``training.distributed`` as resolved, with
    ``blocks`` the class names of the model's repeated layers (tunelab.distributed)."""
    from transformers import TrainingArguments

    t = cfg.training
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=max_steps or t.max_steps or -1,
        learning_rate=lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_ratio or t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        **distributed.trainer_arguments(sharding, t, blocks or []),  # FSDP or DeepSpeed, and checkpointing
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,  # in-training eval needs the loss only; never hold all logits
        # tensorboard is tunelab's own callback (into RUN/tb); the others are the Trainer's (trackers())
        report_to=[x for x in t.report_to if x != "tensorboard"] or "none",
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # log the real loss; a non-finite one stops the run (engine.py)
        include_num_input_tokens_seen="non_padding",
        ddp_backend="gloo" if not torch.cuda.is_available() and world_size() > 1 else None,
        ddp_find_unused_parameters=unused_parameters,
        dataloader_num_workers=0,
    )


def token_budget_steps(cfg: RunConfig, features: list[dict]) -> int | None:
    """With ``training.max_tokens`` and no ``max_steps``: the optimizer steps the budget takes at the data's
    mean tokens per step (the schedule's horizon; TokenBudget stops at the budget itself)."""
    t = cfg.training
    if t.max_tokens is None or t.max_steps is not None or not _rows(features):
        return None
    sample = features.head(ESTIMATE_ROWS) if _streams(features) else features  # a stream: its first rows
    per_step = float(lengths(sample).mean()) * t.batch_size * t.grad_accum * world_size()
    steps = max(1, math.ceil(t.max_tokens / per_step))
    if _streams(features):
        from tunelab.progress import status

        status(
            f"training.max_tokens: the schedule's horizon ({steps} steps) is estimated from the mean length of "
            f"the first {len(sample):,} rows of the stream; the budget itself is counted exactly"
        )
    return steps


def _streams(features) -> bool:
    return getattr(features, "streaming", False)


def _rows(features) -> int:
    """Training rows (a stream's: an epoch's)."""
    return features.n if _streams(features) else len(features)


def epoch_steps(cfg: RunConfig, features) -> int:
    """The optimizer steps ``training.epochs`` take over ``features``."""
    t = cfg.training
    return math.ceil(math.ceil(_rows(features) / (t.batch_size * world_size())) / t.grad_accum * t.epochs)


def trainer(
    s: Session,
    train_features: list[dict],
    eval_data: Prepared | dict[str, Prepared] | None,
    out_dir: Path,
    callbacks: list | None = None,
    throughput: Throughput | None = None,
    **multitask: Any,
):
    """The Trainer for ``s``'s model over ``train_features``, its optimizer's rates resolved once
    (:meth:`StrategyStack.rates`), with every callback attached (the bar and metrics.jsonl reading
    ``throughput``), not yet trained. ``multitask`` holds the engine's multi-task arguments (``sampler``,
    ``tasks``, ``task_weights``, see TunelabTrainer)."""
    from tunelab.callbacks import Throughput, attach
    from tunelab.engine import TunelabTrainer

    cfg = s.cfg
    rates = s.stack.rates(cfg.training.lr)
    throughput = throughput or Throughput()
    t = TunelabTrainer(
        model=s.model,
        args=training_arguments(
            cfg,
            out_dir,
            next(iter(rates.values()), cfg.training.lr or 0.0),  # Trainer's one rate: the first component's
            s.precision,
            eval_data is not None,
            unused_parameters=s.stack.routes_tasks,
            max_steps=token_budget_steps(cfg, train_features)
            or (
                epoch_steps(cfg, train_features)
                if _streams(train_features) and not cfg.training.max_steps
                else None
            ),
            sharding=s.distributed,
            blocks=sorted({type(b).__name__ for b in levers.repeated_blocks(s.model)}),
        ),
        data_collator=Collator(
            s.tokenizer.pad_token_id,
            annotations=True,
            bucket=s.levers.pad_to == "bucket",
            cap=cfg.training.max_length,
        ),
        train_dataset=train_features if _streams(train_features) else features_dataset(train_features),
        eval_dataset=eval_datasets(eval_data),
        processing_class=s.tokenizer,
        stack=s.stack,
        rates=rates,
        positions_head=s.levers.loss_head == "positions",
        optimizer_impl=s.levers.optimizer_impl,
        recast_weights=s.levers.weight_casts == "recompute",
        lean_activations=s.levers.activations == "lean",
        **multitask,
    )
    attach(t, out_dir, cfg.training, throughput, s.stack.callbacks(), callbacks or [])
    return t


def fit(
    s: Session,
    train_features: list[dict],
    eval_data: Prepared | dict[str, Prepared] | None,
    out_dir: Path,
    *,
    resume: bool = False,
    callbacks: list | None = None,
    data_hooks: bool = True,
    **multitask: Any,
) -> dict[str, Any]:
    """Train ``s``'s model over ``train_features`` (after the stack's data hooks, unless the mode ran them),
    with checkpoints and logs under ``out_dir``; returns the training stats. ``eval_data`` may map names to
    splits (each evaluated and logged as ``eval_<name>_loss``)."""
    cfg = s.cfg
    if data_hooks:
        train_features = s.stack.training_features(train_features, s.ctx)
    env = tracker_env(cfg.training.report_to, s.run_dir)
    from tunelab.callbacks import Throughput
    from tunelab.compiling import CompileTimer, graph_key
    from tunelab.models import tunelab_home

    throughput = Throughput()
    tr = trainer(s, train_features, eval_data, out_dir, callbacks, throughput, **multitask)
    checkpoint, skipped = resume_point(out_dir, s.distributed, s.main) if resume else (None, [])
    t = cfg.training
    planned = (  # the horizon the trainer was given (max_steps, or the token budget's), else the epochs'
        tr.args.max_steps if tr.args.max_steps > 0 else epoch_steps(cfg, train_features)
    )
    mode = levers.compile_mode(s.levers, t.compile)
    with (
        recomputing(s.model, s.levers.attention_probs == "recompute"),
        fusing(s.model, s.levers.lora_kernel == "fused"),
        levers.compiled(s.model, mode != "off", deferred=mode == "auto") as start,
        scoped_env(env),
        reusing_freed_memory(s.levers.allocator == "reuse"),
    ):
        timer = None
        if mode != "off":
            timer = CompileTimer(
                start,
                auto=mode == "auto",
                planned=planned,
                key=graph_key(levers.repeated_blocks(s.model), s.precision, s.levers.attention_probs),
                precision=s.precision,
                run_dir=out_dir,
                home=tunelab_home(),
            )
            tr.add_callback(timer)
        out = tr.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
    # the last steps' activations, freed and kept by the allocator for a next step, go back to the system
    # before the model is saved and evaluated: the save's buffers would otherwise come on top of them (LoRA
    # on short rows: 45 MB over the steady steps' resident set, the run's peak; docs/performance.md)
    malloc.release()
    if timer is not None and timer.summary():  # what auto decided, and from which figures
        s.levers.compile = "on" if timer.decision["compile"] else "off"
        s.levers.why["compile"] = timer.summary()
    state = tr.state
    s.model = s.unsharded(tr) if s.distributed in distributed.SHARDED else tr.model
    return {
        "steps": state.global_step,
        "epochs": round(
            state.global_step * t.batch_size * t.grad_accum * world_size() / max(train_features.n, 1)
            if _streams(train_features)
            else state.epoch or 0.0,
            4,
        ),
        "train_loss": out.training_loss,
        "rows": _rows(train_features),
        "streamed": _streams(train_features),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(throughput.rate(state), 2),
        "train_time_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "resumed_from": checkpoint.path.name if checkpoint else None,
        "skipped_checkpoints": [f"{c.path.name}: {c.problem}" for c in skipped],
        "learning_rate": tr.learning_rates(),
    }


def resume_point(out_dir: Path, sharding: str, main: bool) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The newest complete checkpoint (saying which newer ones are skipped, and why); the metrics the
    killed run logged after it are dropped, as they will be logged again."""
    ckpt_dir = out_dir / CHECKPOINTS
    checkpoint, skipped = pick_resume_checkpoint(ckpt_dir)
    if checkpoint:
        distributed.check_resume(checkpoint.layout, sharding, checkpoint.path.name)
    if main:
        shutil.rmtree(ckpt_dir / STAGING, ignore_errors=True)  # a checkpoint a kill cut short
        for c in skipped:
            print(f"resume: skipping {c.path.name} ({c.problem})", flush=True)
        print(
            f"resume: continuing from {checkpoint.path.name}"
            if checkpoint
            else "resume: no complete checkpoint; training from the start",
            flush=True,
        )
        _keep_metrics_through(out_dir / METRICS, checkpoint.step if checkpoint else 0)
    return checkpoint, skipped


def _keep_metrics_through(path: Path, step: int) -> None:
    """On resume from step ``step``: drop the lines the killed run logged after it (they are logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # blank, or the half line a kill -9 cut short
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(x + "\n" for x in kept))
