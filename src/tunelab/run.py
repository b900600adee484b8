"""A run, in a fixed shape: set up -> train -> save -> clean up. Also what reads a finished run back:
evaluation, generation and merging.

Run directory layout::

    RUN/config.yaml       the resolved config (every default filled in)
    RUN/metrics.jsonl     one JSON line per log event (loss, lr, tokens/s, eval loss)
    RUN/tb/               TensorBoard event files
    RUN/checkpoints/      resumable Trainer checkpoints (model, optimizer, scheduler, RNG, data position)
    RUN/model/            the final artefact: a PEFT adapter dir or a standalone safetensors model, + tokenizer
    RUN/summary.json      task metrics, parameters, tokens, tokens/s, peak memory, wall time

Under ``torchrun`` every rank trains; only rank 0 writes anything.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.checkpoints import STAGING, pick_resume_checkpoint
from tunelab.config import ConfigError, RunConfig, load_config
from tunelab.data import Collator, Prepared, features_dataset, prepare_file, prepare_splits
from tunelab.errors import Interrupted, NonFiniteError, RunError
from tunelab.evaluate import generate_batch, loss_and_perplexity, score
from tunelab.forgetting import (
    Reference,
    build_retention_set,
    forgetting_summary,
    measure,
    retention_batches,
    retention_prompts,
)
from tunelab.fsutil import atomic_dir
from tunelab.models import count_parameters, load_model, load_tokenizer, resolve_model, tunelab_home
from tunelab.rundir import CHECKPOINTS, CONFIG, METRICS, MODEL, SUMMARY, RunDir, complete_checkpoints
from tunelab.strategies import build_strategies, mark_trainable

__all__ = ["RunError", "RunResult", "train", "evaluate", "generate", "merge", "load_run"]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # AVX512-BF16 or AMX make bf16 matmuls several times faster than fp32 on CPU
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError(["training.precision: fp16 needs CUDA; on CPU use bf16 or fp32"])
    return precision


def peak_memory_mb(device: str) -> dict[str, Any]:
    if device == "cuda":
        return {"peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux: the process's resident-set high-water mark.
    return {"peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "kind": "cpu_peak_rss"}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- set up


@contextmanager
def guarded(run: RunDir | None, cfg: RunConfig) -> Iterator[None]:
    """Close the claimed run dir whatever happens: a setup that fails leaves it as it was found; a run that
    stops (divergence, interrupt, error) records why in the marker and says how to go on; the lock is
    always released."""
    try:
        yield
    except KeyboardInterrupt:
        if run is None:
            raise Interrupted("interrupted") from None
        began = run.close("interrupted")
        raise Interrupted(f"interrupted; {_how_to_go_on(run, cfg, began)}") from None
    except NonFiniteError as e:
        if run is None:
            raise
        _log_event(run.path, {"event": "diverged", "reason": str(e)})
        run.close("diverged")
        raise NonFiniteError(
            f"{e}; no weights were saved as {MODEL}/. {_how_to_go_on(run, cfg, True)} after lowering "
            "training.lr (or raising regularisation)"
        ) from None
    except BaseException:
        if run is not None:
            run.close("failed")
        raise
    else:
        if run is not None:
            run.close("finished")


def _how_to_go_on(run: RunDir, cfg: RunConfig, began: bool) -> str:
    if not began:
        return f"nothing was written to {run.path}"
    done = complete_checkpoints(run.path)
    if done:
        return f"{run.path} can continue from {done[0].name} with --resume"
    return (
        f"no checkpoint was written yet (training.save_steps={cfg.training.save_steps}); run again to start over"
    )


def _log_event(run_dir: Path, record: dict[str, Any]) -> None:
    metrics = run_dir / METRICS
    if metrics.exists():
        with metrics.open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)


def training_arguments(cfg: RunConfig, run_dir: Path, lr: float, precision: str, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.training
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
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
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,  # in-training eval needs the loss only; never hold all logits
        report_to="none",
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # log the real loss; a non-finite one stops the run (engine.py)
        include_num_input_tokens_seen="non_padding",
        ddp_backend="gloo"
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Context:
    """What strategies' ``prepare`` / ``training_features`` / ``on_task_end`` hooks may use."""

    tokenizer: Any
    device: str
    bf16: bool
    seed: int
    data_cfg: Any
    max_length: int
    retention: Prepared | None
    reference: Reference
    previous_features: list = field(default_factory=list)  # continual: earlier tasks' training rows
    task_features: list = field(default_factory=list)  # continual: the task just trained

    def retention_batches(self, batch_size: int) -> list[dict]:
        if self.retention is None:
            raise RunError("this strategy needs the retention set; set forgetting.enabled: true")
        return retention_batches(self.retention, self.tokenizer.pad_token_id, batch_size, self.device)

    def load_rows(self, path: str) -> list[dict]:
        return prepare_file(path, self.tokenizer, self.data_cfg, self.max_length).features


def _needs_retention(cfg: RunConfig) -> bool:
    needs = {"retention", "replay"}
    return cfg.forgetting.enabled or any(
        s.name in needs or (s.name == "ewc" and s.data == "retention") for s in cfg.strategy
    )


class Session:
    """A loaded base model with its strategies applied: what one run (or one continual sequence) trains."""

    def __init__(self, cfg: RunConfig, main: bool):
        self.cfg, self.main = cfg, main
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(cfg.training.precision, self.device)
        self.bf16 = self.precision == "bf16"
        self.model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
        # read (and check) the retention prompts now: a bad forgetting.file fails before the model loads
        self.retention_prompts = retention_prompts(cfg.forgetting) if _needs_retention(cfg) else None

    def load(self) -> None:
        """Load the base model, build the retention set on it (untouched), apply and mark the strategies."""
        from transformers import set_seed

        cfg = self.cfg
        set_seed(cfg.training.seed)
        self.model = load_model(self.model_dir, allow_pickle=cfg.allow_pickle).to(self.device)
        self.retention = None
        if _needs_retention(cfg):
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
        self.strategies = build_strategies(cfg.strategy)
        model = self.model
        for s in self.strategies:
            model = s.apply(model)
        self.model = model.to(self.device)
        self.components = mark_trainable(self.model, self.strategies)
        self.trainable, self.total = count_parameters(self.model)
        if self.trainable == 0:
            raise RunError(f"strategy {'+'.join(cfg.strategy_names())} leaves no parameter to train")
        if self.main:
            for s in self.strategies:
                line = s.describe(self.model)
                if line:
                    print(line, flush=True)
        if cfg.training.gradient_checkpointing and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()  # frozen embeddings + checkpointing still need input grads
        self.ctx = Context(
            self.tokenizer,
            self.device,
            self.bf16,
            cfg.training.seed,
            self.data_cfg,
            cfg.training.max_length,
            self.retention,
            Reference(self.model, self.strategies, self.model_dir, allow_pickle=cfg.allow_pickle),
        )
        for s in self.strategies:
            s.prepare(self.model, self.ctx)

    def retention_before(self) -> dict[str, Any] | None:
        """Retention metrics of the untouched model: KL 0 and exact reproduction 1 by construction."""
        if self.retention is None or not self.cfg.forgetting.enabled:
            return None
        from tunelab.strategies.switch import adapters_disabled

        # before training a strategy that changes base weights has not changed them yet; one that adds
        # modules is switched off
        with adapters_disabled(self.model):
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

    def fit(
        self,
        train_features: list[dict],
        eval_data: Prepared | None,
        run_dir: Path,
        *,
        resume: bool = False,
        callbacks: list | None = None,
        log_dir: Path | None = None,
    ) -> dict[str, Any]:
        """One Trainer run over ``train_features`` (after the strategies' data hooks); returns train stats."""
        from transformers.integrations import TensorBoardCallback
        from transformers.trainer_callback import ProgressCallback

        from tunelab.engine import BarCallback, MetricsCallback, Throughput, TunelabTrainer

        cfg = self.cfg
        for s in self.strategies:
            train_features = s.training_features(train_features, self.ctx)
        # TrainingArguments needs one rate (it only seeds the optimizer's default); each group's own rate
        # is resolved from training.lr as configured, in the strategies (TunelabTrainer.lr)
        lr = cfg.training.lr or next(s for s in self.strategies if s.trains).default_lr
        log_dir = log_dir or run_dir
        throughput = Throughput()
        trainer = TunelabTrainer(
            model=self.model,
            args=training_arguments(cfg, run_dir, lr, self.precision, eval_data is not None),
            data_collator=Collator(self.tokenizer.pad_token_id),
            train_dataset=features_dataset(train_features),
            eval_dataset=eval_data.dataset() if eval_data is not None else None,
            processing_class=self.tokenizer,
            strategies=self.strategies,
            lr=cfg.training.lr,
        )
        trainer.remove_callback(ProgressCallback)
        tb = TensorBoardCallback()
        tb.logging_dir = str(log_dir / "tb")
        for cb in [
            BarCallback(throughput),
            MetricsCallback(log_dir / METRICS, throughput),
            tb,
            *[c for s in self.strategies for c in s.callbacks()],
            *(callbacks or []),
        ]:
            trainer.add_callback(cb)
        checkpoint, skipped = self._resume_point(run_dir, log_dir) if resume else (None, [])
        out = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
        state = trainer.state
        self.model = trainer.model
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

    def _resume_point(self, run_dir: Path, log_dir: Path):
        """The newest complete checkpoint (saying which newer ones are skipped, and why); the metrics the
        killed run logged after it are dropped, as they will be logged again."""
        ckpt_dir = run_dir / CHECKPOINTS
        checkpoint, skipped = pick_resume_checkpoint(ckpt_dir)
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
            _keep_metrics_through(log_dir / METRICS, checkpoint.step if checkpoint else 0)
        return checkpoint, skipped

    def parameters_summary(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "total": self.total,
            "trainable_pct": round(100 * self.trainable / self.total, 4),
            "components": self.components,
        }


def train(
    config: RunConfig | str | os.PathLike | dict,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
) -> RunResult:
    """Train as ``config`` says and write the run directory. Mirrors ``tunelab train``."""
    t_start = time.perf_counter()
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if cfg.tasks is not None:
        from tunelab.continual import train_continual

        if resume:
            raise RunError("--resume is not supported for continual runs (tasks:); start the sequence again")

        return train_continual(cfg, overwrite=overwrite, callbacks=callbacks)
    main = is_main_process()

    # -- set up: model files, data (bad rows fail here, before the model loads), run dir, model, strategies.
    # The run dir is only checked and locked until model, data and strategies are loaded: a failed setup
    # leaves it as it was, and an old run being replaced is deleted only then (tunelab.rundir).
    session = Session(cfg, main)
    train_data, eval_data = prepare_splits(cfg.data, session.tokenizer, cfg.training.max_length, cfg.training.seed)
    originals = session.original_tasks()
    claim = (
        RunDir.claim(cfg.output_dir, resume=resume, overwrite=overwrite, config=cfg.to_dict()) if main else None
    )
    run_dir = Path(cfg.output_dir)
    with guarded(claim, cfg):
        session.load()
        if claim is not None:
            claim.begin(cfg.to_dict(), resume=resume)
        summary = _train_single(
            session, cfg, train_data, eval_data, originals, run_dir, resume, callbacks, t_start
        )
    del session
    return RunResult(run_dir, summary)


def _train_single(session, cfg, train_data, eval_data, originals, run_dir, resume, callbacks, t_start) -> dict:
    main, tokenizer, bf16 = session.main, session.tokenizer, session.bf16
    summary: dict[str, Any] = {
        "strategy": cfg.strategy_names(),
        "model": str(session.model_dir),
        "device": session.device,
        "precision": session.precision,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "parameters": session.parameters_summary(),
        "data": {
            "format": train_data.format,
            "labels": train_data.labels,
            "train": train_data.stats.as_dict(),
            "eval": eval_data.stats.as_dict() if eval_data else None,
        },
    }
    before = {}
    if main:
        if cfg.eval.before and eval_data is not None:
            summary["eval_before"] = _score_base(session, eval_data)
        before["retention"] = session.retention_before()
        before["original"] = {f: _score_base(session, p) for f, p in originals.items()}

    # -- train
    summary["train"] = session.fit(train_data.features, eval_data, run_dir, resume=resume, callbacks=callbacks)

    # -- save, score (rank 0 only)
    model = session.model
    if not main:
        return {}
    save_artefact(session.strategies, model, tokenizer, run_dir / MODEL)
    if eval_data is not None:
        summary["eval"] = score(model, tokenizer, eval_data, cfg.eval, bf16)
    forgetting: dict[str, Any] = {}
    after = session.retention_after()
    if after is not None:
        forgetting.update(forgetting_summary(before["retention"], after))
    if originals:
        forgetting["original_tasks"] = {
            f: forgetting_summary(before["original"][f], score(model, tokenizer, p, cfg.eval, bf16))
            for f, p in originals.items()
        }
    if forgetting:
        summary["forgetting"] = forgetting
    finish_summary(summary, session.device, run_dir, t_start)
    return summary


def finish_summary(summary: dict[str, Any], device: str, run_dir: Path, t_start: float, **outputs: Path) -> None:
    """Peak memory, wall time and output paths, then ``summary.json`` written atomically (rank 0 only)."""
    summary["memory"] = peak_memory_mb(device)
    summary["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    paths = {"run_dir": run_dir, "model": run_dir / MODEL, "config": run_dir / CONFIG, **outputs}
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    write_json_atomic(run_dir / SUMMARY, summary)


def _score_base(session: Session, prepared: Prepared) -> dict[str, Any]:
    """Scores of the untouched model: added modules disabled, or the frozen copy if base weights will train."""
    from tunelab.strategies.switch import adapters_disabled

    # before training, base weights have not changed yet, and added modules are switched off
    with adapters_disabled(session.model):
        return score(session.model, session.tokenizer, prepared, session.cfg.eval, session.bf16)


def component_dir(model_dir: Path, strategies: list, strategy) -> Path:
    """A single strategy's artefact is the model dir itself (e.g. a plain PEFT adapter dir); in a hybrid each
    component that saves something gets a sub-directory named after it."""
    savers = [s for s in strategies if s.saves]
    return model_dir if len(savers) <= 1 else model_dir / strategy.name


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to save a model holding a non-finite parameter or buffer (the engine stops divergence before
    it gets here; this is the last line)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(t.detach().isfinite().all()):
            raise NonFiniteError(f"refusing to save: {name} holds non-finite values")


def save_artefact(strategies, model, tokenizer, target: Path) -> None:
    """Write the final artefact beside ``target`` and rename it into place: never half-written, never
    non-finite."""
    check_finite(model)
    with atomic_dir(target) as tmp:
        for s in strategies:
            s.save(model, component_dir(tmp, strategies, s))
        tokenizer.save_pretrained(tmp)


# ----------------------------------------------------------------------------- reading runs back


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    strategies: list


def load_run(run_dir: str | Path) -> LoadedRun:
    """The trained model of a run: base model + adapter, or the saved standalone model."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file() and not (run_dir / MODEL).is_dir():
        done = complete_checkpoints(run_dir)
        if done:
            raise RunError(
                f"{run_dir} has no {MODEL}/: the run did not finish (its last checkpoint is {done[0].name}); "
                f"continue it with: tunelab train {run_dir / CONFIG} --resume"
            )
    if not (run_dir / CONFIG).is_file() or not (run_dir / MODEL).is_dir():
        raise RunError(f"{run_dir} is not a finished tunelab run (needs {CONFIG} and {MODEL}/)")
    cfg = load_config(run_dir / CONFIG)
    if cfg.tasks is not None and cfg.continual.per_task_adapter:
        raise RunError(
            f"{run_dir} holds one adapter per task under {MODEL}/<task>/; load one with "
            f"PeftModel.from_pretrained(base, '{run_dir / MODEL}/<task>/<strategy>') or evaluate a task "
            "from continual.json"
        )
    strategies = build_strategies(cfg.strategy)
    tokenizer = load_tokenizer(run_dir / MODEL)
    savers = [s for s in strategies if s.saves]
    if all(s.artefact == "full" for s in savers):
        model = type(savers[0]).load(None, run_dir / MODEL)
    else:
        model = load_model(resolve_model(cfg.model, allow_pickle=cfg.allow_pickle), allow_pickle=cfg.allow_pickle)
        for s in strategies:  # in application order, as in training
            model = type(s).load(model, component_dir(run_dir / MODEL, strategies, s))
    model.eval()
    return LoadedRun(cfg, model, tokenizer, strategies)


def _target(target: str | Path, *, allow_pickle: bool = False):
    """A run dir, or a model name/path (the untouched model, for baselines)."""
    if (Path(target) / CONFIG).is_file():
        return load_run(target)
    model_dir = resolve_model(str(target), allow_pickle=allow_pickle)
    return LoadedRun(None, load_model(model_dir, allow_pickle=allow_pickle).eval(), load_tokenizer(model_dir), [])


def evaluate(target: str | Path, data: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Score a run (or a bare model) on ``data`` (default: the run's eval file). Mirrors ``tunelab eval``."""
    bare = None
    if not (Path(target) / CONFIG).is_file():  # a bare model: its config comes from the overrides alone
        if data is None:
            raise RunError("evaluating a bare model needs --data FILE")
        bare = load_config({"model": str(target), "data": {"train": str(data)}}, overrides)
    loaded = _target(target, allow_pickle=bare.allow_pickle if bare else False)
    if bare is not None:
        cfg = bare
    else:
        cfg = load_config(loaded.cfg.to_dict(), overrides)
    data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
    data = data or (cfg.data.eval if cfg.data is not None else None)
    if data is None:
        raise RunError(f"{target}: the run has no single eval file; pass --data FILE")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.model.to(device)
    labels = None
    if loaded.cfg is not None and (Path(target) / SUMMARY).is_file():
        # classification prompts list the training label set, recorded in the run's summary
        labels = json.loads((Path(target) / SUMMARY).read_text()).get("data", {}).get("labels")
    prepared = prepare_file(data, loaded.tokenizer, data_cfg, cfg.training.max_length, labels=labels)
    bf16 = resolve_precision(cfg.training.precision, device) == "bf16"
    return score(loaded.model, loaded.tokenizer, prepared, cfg.eval, bf16)


def generate(
    target: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    system: str | None = None,
    temperature: float = 0.0,
) -> str:
    """One answer to ``prompt``, rendered with the chat template when the tokenizer has one."""
    loaded = _target(target)
    tok = loaded.tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.model.to(device)
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text, special = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    else:
        text, special = prompt, True
    kwargs = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    bf16 = bf16_supported(device)
    return generate_batch(loaded.model, tok, [(text, special)], max_new_tokens, bf16, **kwargs)[0]


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a run's adapter into the base weights and save a standalone safetensors model."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir} is a file; merge writes a model directory: choose a new directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"{out_dir} is not empty; choose a new directory for the merged model")
    loaded = load_run(run_dir)
    if all(s.artefact == "full" for s in loaded.strategies if s.saves):
        raise RunError(
            f"{run_dir} used {'+'.join(loaded.cfg.strategy_names())}: its {MODEL}/ is already a "
            "standalone model, nothing to merge"
        )
    fixed = [s.name for s in loaded.strategies if not s.mergeable]
    if fixed:
        raise RunError(
            f"{run_dir}: {', '.join(fixed)} cannot be folded into the weights (they add modules or virtual "
            "tokens); serve the run with its base model instead"
        )
    model = loaded.model
    for s in reversed(loaded.strategies):
        model = s.merge(model)
    with atomic_dir(out_dir) as tmp:  # out_dir is absent or empty (checked above)
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        shutil.copy(Path(run_dir) / CONFIG, tmp / "tunelab_config.yaml")
    return out_dir
