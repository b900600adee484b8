"""Several processes: which engine shards the training (``training.distributed``), and the run's way out of it.

tunelab adds no engine of its own. The Trainer runs DDP, FSDP2 and DeepSpeed ZeRO through accelerate; this
module only says which, and does the three things a sharded run needs around the Trainer:

- :func:`resolve` — the mode: ``training.distributed``, or with ``auto`` what the launcher says (an
  ``accelerate launch`` config sets ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), DDP for several
  processes otherwise;
- :func:`trainer_arguments` — the Trainer's ``fsdp`` / ``fsdp_config`` or ``deepspeed`` arguments: FSDP2 wrapping
  each decoder layer (the model's ``_no_split_modules``), sharded checkpoints (``pytorch_model_fsdp_0/``,
  ``optimizer_0/``, one file per process), FSDP's own activation checkpointing; ZeRO-2 or ZeRO-3 with every
  size and precision from the Trainer's arguments (``"auto"``);
- :func:`full_state_dict` / :func:`rebuilt` — after training, every weight whole on the main process, in a
  model of its own, so that what follows (scoring, forgetting, the artefact) runs on an ordinary model there.

FSDP2 on CPU: PyTorch shards on CPU with gloo, but accelerate 1.15 turns FSDP on only for GPU-like
process groups and runs CPU processes as plain DDP, silently. :func:`cpu_fsdp` lifts that one gate while
the Trainer builds its accelerator (nothing else of accelerate's changes), so ``fsdp`` shards on CPU too
(docs/distributed.md). DeepSpeed needs CUDA (accelerate refuses it on CPU) and the ``deepspeed`` package.

Which strategies cannot train under a mode is their own declaration (``Strategy.distributed_problem``):
config validation refuses those combinations before anything loads, and a run checks the mode its launch
chose the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.errors import RunError
from tunelab.runtime import world_size
from tunelab.strategies.base import SHARDED


def resolve(setting: str) -> str:
    """``ddp`` / ``fsdp`` / ``deepspeed`` as set; ``auto``: what an accelerate launch config asks for, else
    ``ddp`` for several processes and ``single`` for one."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def check_launch(cfg: RunConfig, mode: str) -> None:
    """The config's checks for the mode the launch chose (``auto``: several processes, or an accelerate
    launch config's FSDP / DeepSpeed), as if the config had set it."""
    from pydantic import ValidationError

    from tunelab.strategies import StrategyError

    raw = cfg.to_dict()  # training: only what the config set, so that defaults read as defaults
    raw["training"] = {**cfg.training.model_dump(mode="json", exclude_unset=True), "distributed": mode}
    try:
        RunConfig.model_validate(raw)
    except (ValidationError, StrategyError) as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(e, ValidationError) else str(e)
        raise RunError(f"this launch trains in {world_size()} processes with {mode}: {msg}") from None


def preflight(mode: str, device: str) -> None:
    """Refuse, in one line, a sharded mode this launch cannot run."""
    if mode not in SHARDED:
        return
    setting = f"training.distributed: {mode}"
    if world_size() < 2:
        raise RunError(
            f"{setting} shards the model across processes and this run has one: start it with "
            "torchrun --nproc_per_node N (docs/distributed.md), or use auto"
        )
    if mode == "deepspeed":
        if device != "cuda":
            raise RunError(f"{setting} needs CUDA GPUs (accelerate runs DeepSpeed on GPUs only); use fsdp or ddp")
        if importlib.util.find_spec("deepspeed") is None:
            raise RunError(f"{setting} needs the deepspeed package: pip install deepspeed")


def check_resume(layout: str, mode: str, name: str) -> None:
    """A checkpoint is read back by the engine that wrote it: a sharded one by the same sharding."""
    expected = mode if mode in SHARDED else "whole"
    if layout != expected:
        wrote = f"{layout}-sharded" if layout in SHARDED else "whole (ddp or one process)"
        raise RunError(
            f"{name} was written {wrote}, and this run trains with distributed: {mode}; resume it with the "
            "training.distributed it was written with"
        )


def trainer_arguments(mode: str, training, blocks: list[str]) -> dict[str, Any]:
    """The Trainer's arguments for ``mode``, ``training.gradient_checkpointing`` given where the engine wants it;
    ``blocks``: the class names of the model's repeated layers, each wrapped as one FSDP unit."""
    from transformers import TrainingArguments

    # the Trainer's own checkpointing under the name transformers 5 keeps (gradient_checkpointing is its
    # deprecated alias, which warns)
    new_name = "activation_checkpointing" in getattr(TrainingArguments, "__dataclass_fields__", {})
    checkpointing = "activation_checkpointing" if new_name else "gradient_checkpointing"
    # FSDP checkpoints activations itself (the Trainer's own would add an all-gather to every backward)
    arguments: dict[str, Any] = {checkpointing: training.gradient_checkpointing and mode != "fsdp"}
    if mode == "fsdp":
        arguments["fsdp"] = True
        arguments["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"transformer_layer_cls_to_wrap": blocks} if blocks else {}),
            "state_dict_type": "SHARDED_STATE_DICT",  # each process writes its shard: no gather per checkpoint
            "activation_checkpointing": training.gradient_checkpointing,
            "cpu_ram_efficient_loading": False,
        }
    if mode == "deepspeed":
        stage = training.zero_stage or 3
        zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
        if stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        arguments["deepspeed"] = {
            "zero_optimization": zero,
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    return arguments


@contextlib.contextmanager
def cpu_fsdp(on: bool) -> Iterator[None]:
    """While the body runs (the Trainer building its accelerator), a CPU process group given an FSDP plugin
    runs FSDP, as a GPU one does, instead of accelerate's silent fallback to DDP."""
    if not on:
        yield
        return
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init
    try:
        yield
    finally:
        state.AcceleratorState.__init__ = original


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """Every weight of the trained model, whole, in fp32 where it trained in fp32, on the CPU of the main
    process (None on the others). Every process must call it: the shards are gathered, and no process
    returns while a transfer is under way (one that left early could take the process group down with it)."""
    state = _gathered(trainer)
    torch.distributed.barrier()
    return state if trainer.args.process_index == 0 else None


def rebuilt(base: torch.nn.Module, specs: list, trained_stack, state: dict[str, torch.Tensor]):
    """A model of the main process's own after a sharded training: ``base`` (the base model, loaded anew) with
    the strategies (``specs``) applied as ``trained_stack`` was, holding the gathered weights ``state``;
    returned with its stack."""
    from tunelab.strategies.stack import StrategyStack

    stack = StrategyStack(specs)
    stack.set_tasks(*trained_stack.given_tasks)  # multi-task: the same per-task parts
    model = stack.apply(base)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RunError(
            f"the gathered weights do not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model, stack


def held(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: an FSDP2 parameter's local shard, a DeepSpeed ZeRO-3
    parameter's partition, else the parameter."""
    if hasattr(p, "to_local"):
        return p.to_local()
    return getattr(p, "ds_tensor", p)


def _gathered(trainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_deepspeed_enabled:
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in model.named_parameters():
            full = safe_get_full_fp32_param(p)  # the optimizer's fp32 master of a trained weight
            if full is None:  # frozen: no master copy; gather the module's own
                with zero.GatheredParameters([p]):
                    full = p.detach().clone()
            state[name] = full.cpu()
        for name, b in model.named_buffers():
            state[name] = b.detach().cpu()
        return state
    raise RuntimeError("full_state_dict: the Trainer shards nothing")
