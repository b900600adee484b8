"""The final artefact of a run: writing it (atomically, never non-finite) and reading it back."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig, load_config
from tunelab.errors import ModelError, NonFiniteError, RunError, first_line
from tunelab.fsutil import atomic_dir
from tunelab.integrity import check_files, check_loaded, read_json
from tunelab.models import KNOWN_MODELS, load_model, load_tokenizer, resolve_model
from tunelab.rundir import CONFIG, MANIFEST, MODEL, complete_checkpoints, is_run_dir
from tunelab.runtime import write_json_atomic
from tunelab.strategies.base import validate_strategy_specs
from tunelab.strategies.stack import StrategyStack


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to save a model holding a non-finite parameter or buffer (the engine stops divergence before
    it gets here; this is the last line)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(t.detach().isfinite().all()):
            raise NonFiniteError(f"refusing to save: {name} holds non-finite values")


#: What an artefact directory is, beside its files: its kind (``StrategyStack.artefact_kind``), the options of
#: the components that saved something, the base model's public name (never a local path: ``push`` publishes
#: it), and for one set of parts per task, the tasks. :func:`load_artefact` and the model card read it.


def write_manifest(
    folder: Path, stack: StrategyStack, base: tuple[str, Path], tasks: list[str] | None = None
) -> None:
    """``folder/tunelab.json`` for the artefact ``stack`` saved there; ``base`` is the run's ``model`` as
    configured and the directory it resolved to."""
    from tunelab.modelcard import base_model_name

    info = {"kind": stack.artefact_kind, "base_model": base_model_name(*base), "strategy": stack.saved_specs}
    if tasks:
        info["tasks"] = list(tasks)
    write_json_atomic(folder / MANIFEST, info)


def save_artefact(
    stack: StrategyStack, model: torch.nn.Module, tokenizer, target: Path, base: tuple[str, Path]
) -> None:
    """Write the final artefact beside ``target`` and rename it into place: never half-written, never
    non-finite; ``base``: the run's ``model`` as configured and its directory (for the manifest)."""
    check_finite(model)
    with atomic_dir(target) as tmp:
        stack.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, stack, base, stack.task_names)


@dataclass
class LoadedRun:
    cfg: RunConfig | None  # None for a bare model (a baseline)
    model: torch.nn.Module
    tokenizer: Any
    stack: StrategyStack | None


def load_run(run_dir: str | Path) -> LoadedRun:
    """The trained model of a run: base model + its components, or the saved standalone model."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL).is_dir() and is_run_dir(run_dir):  # whatever of it is left: never a bare model
        done = complete_checkpoints(run_dir)
        config = run_dir / CONFIG if (run_dir / CONFIG).is_file() else f"CONFIG (with output_dir: {run_dir})"
        how = (
            f"continue it with: tunelab train {config} --resume"
            if done
            else f"run it again: tunelab train {config}"
        )
        last = f"its last checkpoint is {done[0].name}" if done else "it wrote no checkpoint"
        raise RunError(f"{run_dir} has no {MODEL}/: the run did not finish ({last}); {how}")
    if not (run_dir / CONFIG).is_file() or not (run_dir / MODEL).is_dir():
        raise RunError(f"{run_dir} is not a finished tunelab run (needs {CONFIG} and {MODEL}/)")
    cfg = load_config(run_dir / CONFIG)
    stack = StrategyStack(cfg.strategy)
    tokenizer = load_tokenizer(run_dir / MODEL)

    # the attention the run trained with, where it names one this machine has (else the default)
    named = cfg.training.attention in ("eager", "sdpa")
    attention = {"attn_implementation": cfg.training.attention} if named else {}

    def base() -> torch.nn.Module:
        return load_model(
            resolve_model(cfg.model, allow_pickle=cfg.allow_pickle), allow_pickle=cfg.allow_pickle, **attention
        )

    check_files(run_dir / MODEL, allow_pickle=cfg.allow_pickle)  # before any loader opens a file of it
    try:
        model = stack.load(base, run_dir / MODEL)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
        if isinstance(e, RunError):
            raise
        raise ModelError(f"{run_dir / MODEL}: the run's model could not be loaded ({first_line(e)})") from None
    check_loaded(model, run_dir / MODEL)
    model.eval()
    return LoadedRun(cfg, model, tokenizer, stack)


def load_artefact(path: str | Path, base: str | Path | None = None, task: str | None = None) -> LoadedRun:
    """A trained artefact directory back as a model, with nothing else of its run: a run's ``model/`` or
    its copy from a model hub (what its model card's snippet calls). ``base``: the base model it was trained
    on, a name tunelab knows or a local directory (default: the one the artefact names, where tunelab knows
    it); ``task``: for one set of parts per task, the task to route the model to."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise RunError(f"{path} has no {MANIFEST}: not an artefact directory tunelab wrote (a run's {MODEL}/)")
    info = read_json(path / MANIFEST, what="the artefact")
    check_files(path)  # before any loader opens a file of it
    stack = StrategyStack(validate_strategy_specs(info["strategy"]))
    tasks = info.get("tasks") or []
    if (tasks or task) and task not in tasks:
        raise RunError(f"{path}: holds one set of parts per task; give task= one of {', '.join(tasks) or 'none'}")
    known = next((k for k, m in KNOWN_MODELS.items() if m.hub_id == info["base_model"]), None)

    def base_model() -> torch.nn.Module:
        if base is None and known is None:
            raise RunError(
                f"{path}: give base=, the base model it was trained on ({info['base_model']}): a model tunelab "
                f"knows ({', '.join(KNOWN_MODELS)}) or a local directory"
            )
        return load_model(resolve_model(str(base if base is not None else known)))

    model = stack.load(base_model, path)
    if task:
        stack.select_task(model, task)
    check_loaded(model, path)
    return LoadedRun(None, model.eval(), load_tokenizer(path), stack)
