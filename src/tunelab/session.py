"""A session: the base model loaded, its strategy stack applied, and Trainer runs over it.

Every run mode holds one session: a single run fits it once, a continual run once per task. The session
knows nothing of modes or run directories beyond where a fit writes its checkpoints and logs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab import distributed, levers
from tunelab.checkpoints import STAGING, Checkpoint, pick_resume_checkpoint
from tunelab.config import RunConfig
from tunelab.context import RunContext
from tunelab.data import Collator, Prepared, eval_datasets, features_dataset, prepare_file
from tunelab.errors import RunError
from tunelab.evaluate import loss_and_perplexity, score
from tunelab.forgetting import Reference, build_retention_set, measure, retention_prompts
from tunelab.fsutil import write_text_atomic
from tunelab.models import count_parameters, load_model, load_tokenizer, resolve_model, tunelab_home
from tunelab.progress import enabled as progress_enabled
from tunelab.progress import status
from tunelab.rundir import CHECKPOINTS, METRICS, PREDICTIONS
from tunelab.runtime import device, resolve_precision, world_size
from tunelab.strategies import Need
from tunelab.strategies.stack import StrategyStack
from tunelab.trackers import scoped_env, tracker_env


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
    if t.max_tokens is None or t.max_steps is not None or not features:
        return None
    per_step = sum(f["length"] for f in features) / len(features) * t.batch_size * t.grad_accum * world_size()
    return max(1, math.ceil(t.max_tokens / per_step))


class Session:
    """A loaded base model with its strategies applied: what one run (or one continual sequence) trains."""

    def __init__(self, cfg: RunConfig, main: bool, run_dir: Path):
        """Everything that needs no model: the device, the model directory and tokenizer, the strategy
        stack, and the retention prompts (read now, so a bad ``forgetting.file`` fails before loading)."""
        self.cfg, self.main, self.run_dir = cfg, main, run_dir
        self.device = device()
        self.precision = resolve_precision(cfg.training.precision, self.device)
        self.bf16 = self.precision == "bf16"
        self.model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
        self.stack = StrategyStack(cfg.strategy)
        self.distributed = distributed.resolve(cfg.training.distributed)
        if cfg.training.distributed == "auto" and self.distributed != "single":
            distributed.check_launch(cfg, self.distributed)  # as if the config had said it
        distributed.preflight(self.distributed, self.device)
        self.needs = self.stack.needs | ({Need.RETENTION} if cfg.forgetting.enabled else set())
        self.retention_prompts = retention_prompts(cfg.forgetting) if Need.RETENTION in self.needs else None

    def load(self) -> None:
        """Load the base model, build the retention set on it (untouched), apply the stack, prepare it."""
        from transformers import set_seed

        cfg = self.cfg
        set_seed(cfg.training.seed)
        loaded, options = levers.load_options(
            cfg.training,
            device=self.device,
            precision=self.precision,
            changes_base=self.stack.changes_base_weights,
        )
        self.load_options = options
        self.model = load_model(self.model_dir, allow_pickle=cfg.allow_pickle, **options)
        if loaded.base_quantization == "none":
            self.model = self.model.to(self.device)
        else:
            from peft import prepare_model_for_kbit_training

            self.model = prepare_model_for_kbit_training(
                self.model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
            )
        self.retention = None
        if Need.RETENTION in self.needs:
            self.retention = build_retention_set(
                self.model,
                self.tokenizer,
                self.model_dir,
                self.data_cfg,
                cfg.forgetting,
                cfg.training.max_length,
                self.bf16,
                tunelab_home(),
                self.retention_prompts,
            )
        set_seed(cfg.training.seed)
        self.model = self.stack.apply(self.model).to(self.device)
        self.trainable, self.total = count_parameters(self.model)
        self.levers = levers.resolve(
            cfg.training,
            self.model,
            needs_logits=Need.LOGITS in self.needs,
            changes_base=self.stack.changes_base_weights,
            precision=self.precision,
            loaded=loaded,
            sharded=self.distributed if self.distributed in distributed.SHARDED else None,
        )
        if self.levers.frozen_weights == "bf16":
            trained = {id(p) for p in self.stack.own_parameters(self.model)}
            levers.cast_frozen_linears(self.model, trained)
        if loaded.base_quantization == "none":
            levers.own_storage(self.model)  # no tensor left mapped from the weight file
        if self.trainable == 0 and not self.stack.baseline:
            raise RunError(f"strategy {'+'.join(cfg.strategy_names())} leaves no parameter to train")
        if self.main:
            for line in self.stack.describe(self.model):
                status(line)
        if cfg.training.gradient_checkpointing and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()  # frozen embeddings + checkpointing still need input grads
        self.ctx = RunContext(
            tokenizer=self.tokenizer,
            device=self.device,
            bf16=self.bf16,
            seed=cfg.training.seed,
            data_cfg=self.data_cfg,
            max_length=cfg.training.max_length,
            run_dir=self.run_dir,
            retention=self.retention,
            reference=Reference(self.model, self.stack, self.model_dir, allow_pickle=cfg.allow_pickle),
            allow_pickle=cfg.allow_pickle,
        )
        self.stack.prepare(self.model, self.ctx)

    # -- scores of the untouched model and after training ----------------------------------------
    def score_base(self, prepared: Prepared) -> dict[str, Any]:
        """Scores of the untouched model (before training): added modules switched off."""
        with self.stack.disabled(self.model):
            return score(
                self.model, self.tokenizer, prepared, self.cfg.eval, self.bf16, desc="eval before training"
            )

    def score(self, prepared: Prepared, desc: str = "eval", record: str | None = None) -> dict[str, Any]:
        """Scores of the model as it stands; ``record`` keeps each row's answer (predictions/<record>.jsonl)."""

        def classify(ids, mask):
            return self.stack.classify(self.model, ids.to(self.device), mask.to(self.device), self.bf16)

        out = self.run_dir / PREDICTIONS / f"{record}.jsonl" if record else None
        return score(self.model, self.tokenizer, prepared, self.cfg.eval, self.bf16, 3, classify, desc, out)

    def retention_before(self) -> dict[str, Any] | None:
        """Retention metrics of the untouched model: KL 0 and exact reproduction 1 by construction."""
        if self.retention is None or not self.cfg.forgetting.enabled:
            return None
        with self.stack.disabled(self.model):  # before training, base weights are still the base's
            m = loss_and_perplexity(self.model, self.retention, self.tokenizer.pad_token_id, 8, self.bf16)
        return {
            "kl": 0.0,
            "base_answer_ppl": m["perplexity"],
            "exact_reproduction": 1.0,
            "prompts": len(self.retention.features),
        }

    def retention_after(self) -> dict[str, Any] | None:
        if self.retention is None or not self.cfg.forgetting.enabled:
            return None
        return measure(
            self.model, self.tokenizer, self.retention, self.ctx.reference, self.cfg.forgetting, self.bf16
        )

    def original_tasks(self) -> dict[str, Prepared]:
        return {
            f: prepare_file(f, self.tokenizer, self.data_cfg, self.cfg.training.max_length)
            for f in self.cfg.forgetting.original_tasks
        }

    # -- training ----------------------------------------------------------------------------------
    def fit(
        self,
        train_features: list[dict],
        eval_data: Prepared | dict[str, Prepared] | None,
        out_dir: Path,
        *,
        resume: bool = False,
        callbacks: list | None = None,
        data_hooks: bool = True,
        **multitask: Any,
    ) -> dict[str, Any]:
        """One Trainer run over ``train_features`` (after the stack's data hooks, unless the mode ran them),
        with checkpoints and logs under ``out_dir``; returns the training stats. ``eval_data`` may map names
        to splits (each evaluated and logged as ``eval_<name>_loss``); ``multitask`` holds the engine's
        multi-task arguments (``sampler``, ``tasks``, ``task_weights``, see TunelabTrainer)."""
        from transformers.integrations import TensorBoardCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from tunelab.callbacks import BarCallback, MetricsCallback, Throughput, TokenBudget
        from tunelab.engine import TunelabTrainer

        cfg = self.cfg
        env = tracker_env(cfg.training.report_to, self.run_dir)
        if data_hooks:
            train_features = self.stack.training_features(train_features, self.ctx)
        # TrainingArguments needs one rate (it only seeds the optimizer's default); each group's own rate
        # is resolved from training.lr as configured, by the stack (TunelabTrainer.lr)
        lr = cfg.training.lr or self.stack.default_lr
        throughput = Throughput()
        trainer = TunelabTrainer(
            model=self.model,
            args=training_arguments(
                cfg,
                out_dir,
                lr,
                self.precision,
                eval_data is not None,
                unused_parameters=self.stack.routes_tasks,
                max_steps=token_budget_steps(cfg, train_features),
                sharding=self.distributed,
                blocks=sorted({type(b).__name__ for b in levers.repeated_blocks(self.model)}),
            ),
            data_collator=Collator(self.tokenizer.pad_token_id, annotations=True),
            train_dataset=features_dataset(train_features),
            eval_dataset=eval_datasets(eval_data),
            processing_class=self.tokenizer,
            stack=self.stack,
            lr=cfg.training.lr,
            positions_head=self.levers.loss_head == "positions",
            optimizer_impl=self.levers.optimizer_impl,
            **multitask,
        )
        # tunelab's own bar and metrics.jsonl say what these would (the printer prints every log as a dict; the
        # Trainer takes it instead of its bar when tqdm is off, as under -q)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        tb = TensorBoardCallback()
        tb.logging_dir = str(out_dir / "tb")
        for cb in [
            *([BarCallback(throughput)] if progress_enabled() else []),
            MetricsCallback(out_dir / METRICS, throughput),
            *([tb] if "tensorboard" in cfg.training.report_to else []),
            *self.stack.callbacks(),
            *([TokenBudget(cfg.training.max_tokens)] if cfg.training.max_tokens else []),
            *(callbacks or []),
        ]:
            trainer.add_callback(cb)
        checkpoint, skipped = self._resume_point(out_dir) if resume else (None, [])
        t = cfg.training
        planned = (
            t.max_steps
            or token_budget_steps(cfg, train_features)
            or math.ceil(math.ceil(len(train_features) / (t.batch_size * world_size())) / t.grad_accum * t.epochs)
        )
        with levers.compiled(self.model, levers.compile_pays(self.levers, t.compile, planned)), scoped_env(env):
            out = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
        state = trainer.state
        self.model = self._unsharded(trainer) if self.distributed in distributed.SHARDED else trainer.model
        return {
            "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4),
            "train_loss": out.training_loss,
            "rows": len(train_features),
            "tokens_seen": int(state.num_input_tokens_seen),
            "tokens_per_s": round(throughput.rate(state), 2),
            "train_time_s": round(out.metrics.get("train_runtime", 0.0), 2),
            "resumed_from": checkpoint.path.name if checkpoint else None,
            "skipped_checkpoints": [f"{c.path.name}: {c.problem}" for c in skipped],
            "learning_rate": trainer.learning_rates(),
        }

    def _unsharded(self, trainer) -> torch.nn.Module | None:
        """After a sharded training: the trained weights, gathered whole, in a model of the main process's own
        (the base model with the stack applied anew), on which scoring, forgetting and the artefact run as
        after any training; None on the other processes, whose part is done."""
        state = distributed.full_state_dict(trainer)  # every process takes part in the gather
        if not self.main:
            return None
        base = load_model(self.model_dir, allow_pickle=self.cfg.allow_pickle, **self.load_options)
        model, self.stack = distributed.rebuilt(base, self.cfg.strategy, self.stack, state)
        self.ctx.reference = Reference(model, self.stack, self.model_dir, allow_pickle=self.cfg.allow_pickle)
        return model.to(self.device)

    def _resume_point(self, out_dir: Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
        """The newest complete checkpoint (saying which newer ones are skipped, and why); the metrics the
        killed run logged after it are dropped, as they will be logged again."""
        ckpt_dir = out_dir / CHECKPOINTS
        checkpoint, skipped = pick_resume_checkpoint(ckpt_dir)
        if checkpoint:
            distributed.check_resume(checkpoint.layout, self.distributed, checkpoint.path.name)
        if self.main:
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

    # -- what every summary starts with --------------------------------------------------------------
    def summary_head(self, mode: str) -> dict[str, Any]:
        return {
            "mode": mode,
            "strategy": self.cfg.strategy_names(),
            "model": str(self.model_dir),
            "device": self.device,
            "precision": self.precision,
            "world_size": world_size(),
            "distributed": self.distributed,
            "levers": self.levers.as_dict(),
            "parameters": {
                "trainable": self.trainable,
                "total": self.total,
                "trainable_pct": round(100 * self.trainable / self.total, 4),
                "components": self.stack.components,
            },
        }


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
