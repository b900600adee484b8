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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tunelab.config import ConfigError, RunConfig, load_config
from tunelab.data import Collator, prepare_file, prepare_splits
from tunelab.evaluate import generate_batch, score
from tunelab.fsutil import atomic_dir
from tunelab.models import count_parameters, load_model, load_tokenizer, resolve_model
from tunelab.strategies import build_strategies, mark_trainable

CONFIG, SUMMARY, METRICS, MODEL, CHECKPOINTS = (
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    "model",
    "checkpoints",
)


class RunError(RuntimeError):
    pass


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


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"]


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    resolved = cfg.to_dict()
    if resume:
        saved_path = run_dir / CONFIG
        if not saved_path.is_file():
            raise RunError(f"--resume: {saved_path} does not exist; there is no run to resume in {run_dir}")
        changed = _diff(yaml.safe_load(saved_path.read_text()), resolved)
        if changed:
            raise RunError(
                f"--resume: the config differs from the one {run_dir} was started with: " + "; ".join(changed)
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(
                f"output_dir {run_dir} is not empty; use --resume to continue that run, "
                "--overwrite to replace it, or choose another output_dir"
            )
        if not (run_dir / CONFIG).is_file():
            raise RunError(
                f"--overwrite: {run_dir} does not look like a tunelab run (no {CONFIG}); not deleting it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


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
        include_num_input_tokens_seen="non_padding",
        ddp_backend="gloo"
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


# ----------------------------------------------------------------------------- the run


def train(
    config: RunConfig | str | os.PathLike | dict,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
) -> RunResult:
    """Train as ``config`` says and write the run directory. Mirrors ``tunelab train``."""
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    from tunelab.engine import BarCallback, MetricsCallback, Throughput, TunelabTrainer

    t_start = time.perf_counter()
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.training.precision, device)
    main = is_main_process()

    # -- set up: model files, data (bad rows fail here, before the model loads), run dir, model, strategies.
    # The run dir is written only once the inputs are known good, so a failed setup leaves nothing behind.
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    train_data, eval_data = prepare_splits(cfg.data, tokenizer, cfg.training.max_length, cfg.training.seed)
    run_dir = prepare_run_dir(cfg, resume, overwrite) if main else Path(cfg.output_dir)
    set_seed(cfg.training.seed)
    model = load_model(model_dir)
    strategies = build_strategies(cfg.strategy)
    for s in strategies:
        model = s.apply(model)
    components = mark_trainable(model, strategies)  # exactly the strategies' own parameters train
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise RunError(f"strategy {'+'.join(cfg.strategy_names())} leaves no parameter to train")
    if main:
        for s in strategies:
            line = s.describe(model)
            if line:
                print(line, flush=True)
    if cfg.training.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings + checkpointing still need input grads
    lr = cfg.training.lr or strategies[0].default_lr
    bf16 = precision == "bf16"

    summary: dict[str, Any] = {
        "strategy": cfg.strategy_names(),
        "model": str(model_dir),
        "device": device,
        "precision": precision,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "parameters": {
            "trainable": trainable,
            "total": total,
            "trainable_pct": round(100 * trainable / total, 4),
            "components": components,
        },
        "data": {
            "format": train_data.format,
            "labels": train_data.labels,
            "train": train_data.stats.as_dict(),
            "eval": eval_data.stats.as_dict() if eval_data else None,
        },
    }
    if main and cfg.eval.before and eval_data is not None:
        model.to(device)
        summary["eval_before"] = score(model, tokenizer, eval_data, cfg.eval, bf16)

    # -- train
    throughput = Throughput()
    args = training_arguments(cfg, run_dir, lr, precision, eval_data is not None)
    trainer = TunelabTrainer(
        model=model,
        args=args,
        data_collator=Collator(tokenizer.pad_token_id),
        train_dataset=train_data.dataset(),
        eval_dataset=eval_data.dataset() if eval_data is not None else None,
        processing_class=tokenizer,
        strategies=strategies,
    )
    trainer.remove_callback(ProgressCallback)
    tb = TensorBoardCallback()
    tb.logging_dir = str(run_dir / "tb")
    for cb in [
        BarCallback(throughput),
        MetricsCallback(run_dir / METRICS, throughput),
        tb,
        *[c for s in strategies for c in s.callbacks()],
        *(callbacks or []),
    ]:
        trainer.add_callback(cb)
    checkpoint = (
        get_last_checkpoint(str(run_dir / CHECKPOINTS)) if resume and (run_dir / CHECKPOINTS).is_dir() else None
    )
    out = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    train_time = out.metrics.get("train_runtime", 0.0)
    summary["train"] = {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "train_loss": out.training_loss,
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(throughput.rate(state), 2),
        "train_time_s": round(train_time, 2),
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "learning_rate": lr,
    }

    # -- save, score (rank 0 only), clean up
    model = trainer.model
    if main:
        save_artefact(strategies, model, tokenizer, run_dir / MODEL)
        if eval_data is not None:
            summary["eval"] = score(model, tokenizer, eval_data, cfg.eval, bf16)
        summary["memory"] = peak_memory_mb(device)
        summary["wall_time_s"] = round(time.perf_counter() - t_start, 2)
        summary["outputs"] = {
            "run_dir": str(run_dir),
            "model": str(run_dir / MODEL),
            "config": str(run_dir / CONFIG),
        }
        write_json_atomic(run_dir / SUMMARY, summary)
    del trainer, model
    return RunResult(run_dir, summary)


def component_dir(model_dir: Path, strategies: list, strategy) -> Path:
    """A single strategy's artefact is the model dir itself (e.g. a plain PEFT adapter dir); in a hybrid each
    component gets a sub-directory named after it."""
    return model_dir if len(strategies) == 1 else model_dir / strategy.name


def save_artefact(strategies, model, tokenizer, target: Path) -> None:
    """Write the final artefact beside ``target`` and rename it into place: never half-written."""
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
    if not (run_dir / CONFIG).is_file() or not (run_dir / MODEL).is_dir():
        raise RunError(f"{run_dir} is not a finished tunelab run (needs {CONFIG} and {MODEL}/)")
    cfg = load_config(run_dir / CONFIG)
    strategies = build_strategies(cfg.strategy)
    tokenizer = load_tokenizer(run_dir / MODEL)
    if all(s.artefact == "full" for s in strategies):
        model = type(strategies[0]).load(None, run_dir / MODEL)
    else:
        model = load_model(resolve_model(cfg.model))
        for s in strategies:  # in application order, as in training
            model = type(s).load(model, component_dir(run_dir / MODEL, strategies, s))
    model.eval()
    return LoadedRun(cfg, model, tokenizer, strategies)


def _target(target: str | Path):
    """A run dir, or a model name/path (the untouched model, for baselines)."""
    if (Path(target) / CONFIG).is_file():
        return load_run(target)
    model_dir = resolve_model(str(target))
    return LoadedRun(None, load_model(model_dir).eval(), load_tokenizer(model_dir), [])


def evaluate(target: str | Path, data: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Score a run (or a bare model) on ``data`` (default: the run's eval file). Mirrors ``tunelab eval``."""
    loaded = _target(target)
    if loaded.cfg is None:
        if data is None:
            raise RunError("evaluating a bare model needs --data FILE")
        cfg = load_config({"model": str(target), "data": {"train": str(data)}}, overrides)
    else:
        cfg = load_config(loaded.cfg.to_dict(), overrides)
    data = data or cfg.data.eval
    if data is None:
        raise RunError(f"{target}: the run has no eval file; pass --data FILE")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.model.to(device)
    labels = None
    if loaded.cfg is not None and (Path(target) / SUMMARY).is_file():
        # classification prompts list the training label set, recorded in the run's summary
        labels = json.loads((Path(target) / SUMMARY).read_text())["data"].get("labels")
    prepared = prepare_file(data, loaded.tokenizer, cfg.data, cfg.training.max_length, labels=labels)
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
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"{out_dir} is not empty; choose a new directory for the merged model")
    loaded = load_run(run_dir)
    if all(s.artefact == "full" for s in loaded.strategies):
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
