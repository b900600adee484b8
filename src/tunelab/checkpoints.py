"""Resumable checkpoints that are never half-written, and finding the newest complete one.

The Trainer writes ``checkpoints/checkpoint-N/`` file by file; a kill or a full disk in the middle leaves a
folder that looks like a checkpoint but cannot be loaded. tunelab's trainer writes each checkpoint under
``checkpoints/.staging/checkpoint-N/`` and renames it into place when every file is written (a rename is
atomic on one file system), so a ``checkpoint-N`` folder is complete by construction. Folders that are not
(written by hand, by an older tunelab, or damaged since) are recognised by :func:`inspect` and skipped by
:func:`pick_resume_checkpoint`, which says which it skipped and why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.integrity import NON_FINITE, non_finite_tensor, safetensors_problem, torch_file_problem

STAGING = ".staging"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What the Trainer writes into every checkpoint: model weights (a full model or an adapter) and its state.
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# Sharded (FSDP, through accelerate): one folder of torch.distributed.checkpoint files each for the weights
# and the optimizer state, every process writing its shards; the metadata file is written once all are.
FSDP_WEIGHTS, FSDP_OPTIMIZER, DCP_METADATA = "pytorch_model_fsdp_0", "optimizer_0", ".metadata"


@dataclass
class Checkpoint:
    path: Path
    step: int
    problem: str | None  # None when complete
    layout: str = "whole"  #: who wrote it: "whole" (one process's copy), or the sharded "fsdp" / "deepspeed"

    @property
    def complete(self) -> bool:
        return self.problem is None


def _deepspeed_tag(path: Path) -> str | None:
    """The folder of a DeepSpeed checkpoint's states (named in its ``latest`` file), when it is one."""
    try:
        tag = (path / "latest").read_text().strip()
    except OSError:
        return None
    return tag if tag and (path / tag).is_dir() else None


def inspect(path: Path) -> Checkpoint:
    m = _NAME.match(path.name)
    step = int(m.group(1)) if m else -1
    state = path / "trainer_state.json"
    try:
        saved_step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError):
        return Checkpoint(path, step, "trainer_state.json missing or unreadable")
    if saved_step != step:
        return Checkpoint(path, step, f"trainer_state.json is for step {saved_step}")
    fsdp = (path / FSDP_WEIGHTS / DCP_METADATA).is_file()
    deepspeed = _deepspeed_tag(path)
    weights = [path / w for w in _WEIGHTS if (path / w).is_file()]
    if not weights and not fsdp and deepspeed is None:
        return Checkpoint(path, step, "no model weights")
    for w in [*weights, *sorted(path.glob("*.safetensors"))]:
        if w.suffix == ".safetensors":
            problem = safetensors_problem(w)
            if problem:
                return Checkpoint(path, step, f"{w.name} {problem}")
    if fsdp and not (path / FSDP_OPTIMIZER / DCP_METADATA).is_file():
        return Checkpoint(path, step, f"{FSDP_OPTIMIZER} (sharded optimizer state) missing or incomplete")
    if deepspeed is not None and not list((path / deepspeed).glob("*optim_states.pt")):
        return Checkpoint(path, step, f"{deepspeed}: DeepSpeed optimizer states missing")
    layout = "fsdp" if fsdp else "deepspeed" if deepspeed is not None else "whole"
    required = ["optimizer.pt", "scheduler.pt"]
    if layout == "whole" and _written_at_horizon(state):  # resumed, it trains no step more
        required = []
    if fsdp or deepspeed is not None:
        required.remove("optimizer.pt")  # its state is in the shards
    if deepspeed is not None:
        required.remove("scheduler.pt")  # the Trainer leaves a schedule DeepSpeed wraps to DeepSpeed's states
    for name in required:
        if not (path / name).is_file():
            return Checkpoint(path, step, f"{name} missing")
        problem = torch_file_problem(path / name)
        if problem:
            return Checkpoint(path, step, f"{name} {problem}")
    if not list(path.glob("rng_state*.pth")):
        return Checkpoint(path, step, "RNG state missing", layout)
    return Checkpoint(path, step, None, layout)


def at_horizon(global_step: int, max_steps: int) -> bool:
    """Whether a checkpoint at ``global_step`` is at the run's last planned step. A resume from it trains no
    step more (and a resume with another config is refused), so its optimizer and schedule states would never
    be read and are not written (tunelab.engine): for full fine-tuning of the default model, 1.08 GB and 3 s
    of a 20-step run. A checkpoint where training was only cut short (a search's rung) keeps them: its
    candidate may be continued."""
    return global_step >= max_steps > 0


def _written_at_horizon(trainer_state: Path) -> bool:
    try:
        state = json.loads(trainer_state.read_text())
        return at_horizon(int(state["global_step"]), int(state["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(ckpt_dir: Path) -> list[Checkpoint]:
    """Every ``checkpoint-N`` folder, newest first, each with what is wrong with it (if anything)."""
    if not ckpt_dir.is_dir():
        return []
    found = [inspect(p) for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)


def pick_resume_checkpoint(ckpt_dir: Path) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """The newest complete checkpoint whose weights are finite, and the newer ones skipped because they are
    incomplete or hold NaN / inf (the values are read only here, for the one checkpoint about to be used)."""
    skipped = []
    for c in list_checkpoints(ckpt_dir):
        if c.complete:
            bad = [(w.name, t) for w in sorted(c.path.glob("*.safetensors")) if (t := non_finite_tensor(w))]
            if not bad:
                return c, skipped
            c.problem = f"{bad[0][0]}: tensor {bad[0][1]} {NON_FINITE}"
        skipped.append(c)
    return None, skipped
