"""The training engine: ``transformers.Trainer``, subclassed at three points.

Why Trainer rather than a loop on ``accelerate``: it already gives, tested by many users, gradient
accumulation, LR schedules, mixed precision on CPU and CUDA, resumable checkpoints (model, optimizer,
scheduler, RNG and data position), DDP under ``torchrun`` (gloo on CPU), length-grouped sampling and
TensorBoard logging. tunelab needs to change only what strategies decide (docs/design.md):

- ``create_optimizer``: parameter groups (and their learning rates) come from the strategies; AdamW in the
  implementation ``training.optimizer_impl`` resolves to (tunelab.levers);
- ``compute_loss``: in training, the task loss (weighted where a strategy asks) plus every strategy's extra
  loss terms, summed without knowing them; in evaluation the task loss alone. With ``loss_head:
  positions`` the task loss comes from the vocabulary head applied to the loss positions only
  (tunelab.losshead), normalised exactly as the Trainer's own path;
- callbacks (tunelab.callbacks): a progress bar showing loss and tokens/s, and ``metrics.jsonl`` in the run dir;
- multi-task runs: the run mode's batch sampler (each batch from one task), and batches that carry their
  ``task``: the model is routed to that task's parts (``stack.select_task``), its loss weighted by the
  task's weight and logged per task (``loss/<task>``).

and at five more for reliability (docs/reliability.md):

- ``_get_train_sampler``: length-grouped batches whose shuffle depends only on (seed, epoch), so a
  resume in the middle of any epoch sees exactly the order the uninterrupted run saw;
- ``training_step`` / ``_get_grad_norm``: a non-finite loss or gradient norm stops the run with
  :class:`NonFiniteError` before the optimizer step uses it (the Trainer's own NaN filter, which logs a
  made-up loss instead, is off). Once both are finite an AdamW step with bounded lr and weight decay
  cannot make a weight non-finite, so the weights themselves are checked where it matters, before each
  checkpoint is written (0.12 s for 135M parameters on 2 cores: too much for every step);
- ``_save_checkpoint``: each checkpoint is written under ``checkpoints/.staging/`` and renamed into
  place when complete (tunelab.checkpoints); a failed write (disk full) removes the partial copy, keeps
  the previous checkpoints and says so. For a PEFT-wrapped model, whose checkpoint the Trainer writes as
  the PEFT adapter alone, every trained tensor is also written to ``trainable.safetensors`` and read back
  on resume (``_load_from_checkpoint``): a hybrid's native parts (bottleneck adapters, layer-wise base
  weights) resume exactly too;
- ``_run_epoch``: a stop that already holds when training begins (a resume from a search's cut or a token
  budget's last step, killed before its summary) trains no step past it.

and at one for sharding: ``create_accelerator_and_postprocess`` lets FSDP2 run on CPU as on CUDA and stops a
run whose FSDP or DeepSpeed accelerate did not turn on (tunelab.distributed).

The engine never names a strategy.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import rotate_checkpoints

from tunelab.checkpoints import STAGING, at_horizon
from tunelab.data import ANNOTATIONS
from tunelab.distributed import cpu_fsdp, held
from tunelab.errors import NonFiniteError, RunError, first_line, lost_peer
from tunelab.fsutil import write_failure
from tunelab.levers import adamw
from tunelab.losshead import PositionsHead
from tunelab.saved import keeping_less
from tunelab.strategies.base import StrategyError, load_named_tensors

TRAINABLE = "trainable.safetensors"  #: every trained tensor of a PEFT-wrapped model, in each checkpoint


class EpochLengthGroupedSampler(torch.utils.data.Sampler):
    """Length-grouped order (megabatches of similar lengths, shuffled) drawn from a generator seeded with
    ``seed + epoch``: the same for a run and for its resume, whatever the global RNG did meanwhile.
    (transformers' LengthGroupedSampler draws from the global RNG at the start of each epoch, which a
    resume restores to the checkpoint's state, not to the epoch start's: another order.)"""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class TunelabTrainer(Trainer):
    def __init__(
        self,
        *args,
        stack,
        rates: dict[str, float],
        sampler=None,
        tasks: list[str] | None = None,
        task_weights: list[float] | None = None,
        positions_head: bool = False,
        optimizer_impl: str = "fused",
        recast_weights: bool = False,
        lean_activations: bool = False,
        **kwargs,
    ):
        """``stack`` is the run's :class:`~tunelab.strategies.stack.StrategyStack`; ``rates`` its training
        components' rates, as the stack resolved them once (:meth:`StrategyStack.rates`), from which each
        component builds its optimizer groups. Multi-task runs give
        ``sampler(dataset, batch_size, seed)`` (the run mode's order), the task names a batch's ``task``
        indexes, and each task's loss weight."""
        super().__init__(*args, **kwargs)
        self.recast_weights, self.lean_activations = recast_weights, lean_activations
        if recast_weights:  # autocast's cache would keep every cast weight to the end of the forward
            from accelerate.utils import AutocastKwargs

            self.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)
        self.stack = stack
        self.rates = rates
        self.positions_head, self.optimizer_impl = positions_head, optimizer_impl
        self.sampler, self.tasks = sampler, tasks or []
        self.task_weights = task_weights or [1.0] * len(self.tasks)
        # per task, since the last log: the sum of its batches' mean losses, and their count
        self._task_loss = [[0.0, 0] for _ in self.tasks]
        self._last_terms: dict[str, float] = {}
        self._staging = False

    # -- the engine that shards (training.distributed, tunelab.distributed) ------------------------
    def create_accelerator_and_postprocess(self):
        sharding = bool(self.args.fsdp or self.args.deepspeed)
        with cpu_fsdp(bool(self.args.fsdp) and self.args.use_cpu):  # FSDP2 on CPU too
            super().create_accelerator_and_postprocess()
        if sharding and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            mode = "fsdp" if self.args.fsdp else "deepspeed"
            raise RunError(f"training.distributed: {mode}: accelerate did not turn it on here")

    # -- data order -----------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.sampler is not None:  # batches of one task across all processes: the rows one process would see
            batch = self.args.per_device_train_batch_size * self.args.world_size
            return self.sampler(ds, batch, self.args.data_seed or self.args.seed)
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in ds.column_names:
            return super()._get_train_sampler(train_dataset)
        # groups of one global batch (every process's rows of one optimizer step): with N processes each
        # takes its consecutive share of it, so the steps see the rows one process would (same losses)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthGroupedSampler(ds["length"], batch, self.args.data_seed or self.args.seed)

    def _run_epoch(self, *args, **kwargs):
        if not self.control.should_training_stop:  # set at train begin: the resumed run is already done
            super()._run_epoch(*args, **kwargs)

    # -- nothing non-finite is used or saved ----------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        with keeping_less(self.recast_weights, self.lean_activations):  # weight_casts, activations
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"training diverged at step {self.state.global_step + 1}: the loss is {float(loss)}"
            )
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteError(
                f"training diverged at step {self.state.global_step + 1}: the gradient norm is {float(norm)}"
            )
        return norm

    # -- atomic checkpoints ---------------------------------------------------------------------
    def _get_output_dir(self, trial):
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if self._staging else root

    def _save_checkpoint(self, model, trial):
        self._check_weights()  # no checkpoint ever holds a non-finite weight
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged, final = root / STAGING / name, root / name
        writer = self.args.should_save
        if writer and staged.exists():
            shutil.rmtree(staged)  # left by a run killed while writing this step
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if writer:
                self._save_trainable(staged)
            self._barrier()  # every rank has written its part (RNG states) before rank 0 renames
        except Exception as e:
            if writer:
                shutil.rmtree(staged, ignore_errors=True)
            if lost_peer(e):
                raise  # not this write's fault: another process is gone (tunelab.rundir.guarded says so)
            kept = sorted(p.name for p in root.glob("checkpoint-*"))
            raise RunError(
                f"writing {name} failed ({write_failure(e, root) or first_line(e)}); nothing was half-written, "
                f"{'kept: ' + ', '.join(kept) if kept else 'no earlier checkpoint exists'}"
            ) from None
        finally:
            self._staging = False
        if writer:
            if final.exists():
                shutil.rmtree(final)  # a stale copy of this step from a run that was resumed before it
            staged.rename(final)
            staged.parent.rmdir()  # empty now; a .staging left behind means a write that was cut short
            rotate_checkpoints(str(root), save_total_limit=self.args.save_total_limit)
        self._barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if at_horizon(self.state.global_step, self.state.max_steps) and not sharded:
            return  # a resume from here trains no step more (tunelab.checkpoints.inspect)
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_trainable(self, out_dir: Path) -> None:
        from peft import PeftModel
        from safetensors.torch import save_file

        if not isinstance(self.model, PeftModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return  # the Trainer saved the whole model (sharded: every process its shards of every weight)
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        save_file({names[id(p)]: p.detach().cpu().contiguous().clone() for p in params}, out_dir / TRAINABLE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / TRAINABLE
        if path.is_file():
            try:
                load_named_tensors(self.model, path, plain=False)
            except StrategyError as e:
                raise RunError(f"{e}; was the config changed since the checkpoint was written?") from None

    def _check_weights(self) -> None:
        """Every process checks the weights it holds (its shards, when sharded); all stop if one finds a
        non-finite value."""
        params = [held(p) for g in self.optimizer.param_groups for p in g["params"]]
        params = [p for p in params if p.numel()]
        finite = torch.stack([p.detach().isfinite().all() for p in params]).all() if params else torch.tensor(True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            finite = finite.to(device=self.args.device, dtype=torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise NonFiniteError(
                f"training diverged at step {self.state.global_step}: the weights became non-finite"
            )

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            # As Trainer does: no weight decay on biases and norm weights.
            decay = set(self.get_decay_parameter_names(model))
            names = {id(p): n for n, p in model.named_parameters()}
            groups, seen = [], set()
            for g in self.stack.param_groups(model, self.rates):
                ids = {id(p) for p in g["params"]}
                if ids & seen:
                    raise ValueError(f"parameter group '{g.get('name')}' repeats parameters of another group")
                seen |= ids
                opts = {k: v for k, v in g.items() if k != "params"}  # the name rides along, for logs
                for wd, keep in ((self.args.weight_decay, True), (0.0, False)):
                    params = [p for p in g["params"] if (names.get(id(p)) in decay) == keep]
                    if params:
                        groups.append({**opts, "params": params, "weight_decay": wd})
            if not seen:
                raise ValueError("no parameter trains: the strategy left every parameter frozen")
            self.optimizer = adamw(
                groups,
                self.optimizer_impl,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: ``w · task loss + Σ terms``, with ``w`` the product of the strategies' task-loss
        weights (1 unless one, e.g. distillation, reweights it). Evaluation (``prediction_step`` calls this
        too): the task loss alone, so ``eval_loss`` means the same for every strategy and no term's state
        (e.g. the retention loss's batch counter) moves."""
        notes = {k: inputs.pop(k) for k in ANNOTATIONS if k in inputs}  # for us and the strategies, not the model
        task = notes.get("task")
        if task is not None:
            t = int(task[0])
            if not bool((task == t).all()):
                raise RuntimeError("a multi-task batch mixes tasks; the run mode's sampler must not")
            self.stack.select_task(model, self.tasks[t])
        if self.positions_head and "labels" in inputs:
            loss, outputs = self._loss_on_positions(model, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if task is not None and model.training:
            labels = inputs["labels"][:, 1:]
            tokens = int((labels != -100).sum())
            # the Trainer divides by the tokens of the whole accumulated step; this batch's mean is logged
            mean = float(loss.detach()) * (float(num_items_in_batch) / max(tokens, 1) if num_items_in_batch else 1)
            self._task_loss[t][0] += mean
            self._task_loss[t][1] += 1
            if self.task_weights[t] != 1.0:
                loss = self.task_weights[t] * loss
        if model.training:
            loss, parts = self.stack.training_loss(model, {**inputs, **notes}, outputs, loss)
            self._last_terms = {k: float(v.detach()) for k, v in parts.items()} if len(parts) > 1 else {}
        return (loss, outputs) if return_outputs else loss

    def _loss_on_positions(self, model, inputs, num_items_in_batch):
        """The task loss as ``Trainer.compute_loss`` takes it, with the vocabulary head applied to the positions
        that carry loss only (tunelab.losshead); the outputs' logits are then empty."""
        head = PositionsHead(self.accelerator.unwrap_model(model))
        with head.capturing(inputs["labels"]):
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # as the Trainer: the model's own mean, scaled for accumulation later
        loss = head.loss(num_items_in_batch)
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss, outputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({f"loss_terms/{k}": v for k, v in self._last_terms.items()})
            if self.tasks:  # every rank logs (the Trainer gathers the loss there too): sum their batches
                acc = torch.tensor(self._task_loss, dtype=torch.float64, device=self.args.device)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(acc)
                for name, (total, n) in zip(self.tasks, acc.tolist(), strict=True):
                    if n:
                        logs[f"loss/{name}"] = round(total / n, 4)
                self._task_loss = [[0.0, 0] for _ in self.tasks]
            if self.optimizer is not None:  # every group's current rate, not only the first group's
                for g in self.optimizer.param_groups:
                    logs.setdefault(f"lr/{g.get('name', 'group')}", g["lr"])
        super().log(logs, start_time)

    def learning_rates(self) -> dict[str, float]:
        """The peak learning rate of each component, as resolved for the optimizer."""
        return self.stack.learning_rates(self.model, self.rates)
