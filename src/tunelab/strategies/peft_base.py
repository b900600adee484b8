"""Shared code for strategies that PEFT implements: apply, own parameters, save, load, merge.

A PEFT strategy only says which ``peft`` config it builds (``peft_config``). Its own parameters are found
by asking the modules: PEFT tuner layers (``BaseTunerLayer``) list their adapter sub-modules in
``adapter_layer_names``; prompt learners keep theirs in the wrapper's ``prompt_encoder``; modules trained
in full are ``ModulesToSaveWrapper`` copies. Its artefact is exactly what ``PeftModel.save_pretrained``
writes, so ``PeftModel.from_pretrained(base, dir)`` loads it unchanged.

With ``per_task: true`` (mode: multitask) the strategy builds one adapter per task with PEFT's own
multi-adapter API: the adapters are named after the tasks (``get_peft_model(..., adapter_name=first)``, then
``add_adapter`` for each other task), ``select_task`` is ``PeftModel.set_adapter(task)``, and the artefact is
what ``save_pretrained`` writes for named adapters: one PEFT adapter directory per task, ``<dir>/<task>/``,
each loadable on its own with ``PeftModel.from_pretrained(base, "<dir>/<task>")``, plus ``tasks.json``
listing them in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from tunelab.strategies.base import Declaration, Phase, Strategy, StrategyError, unwrap
from tunelab.strategies.capabilities import Mergeable, PerTask, ShardingLimits

TASKS_FILE = "tasks.json"


class PeftStrategy(Strategy, PerTask, ShardingLimits):
    declares = Declaration(phase=Phase.TUNER, artefact="peft")

    def peft_config(self, model: torch.nn.Module) -> PeftConfig:
        raise NotImplementedError

    @property
    def adapters(self) -> list[str]:
        """The PEFT adapter names this strategy trains: one per task, or PEFT's ``default``."""
        return list(self.tasks) if self.per_task else ["default"]

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = unwrap(model)
        first, *others = self.adapters
        try:
            self.peft_model = get_peft_model(inner, self.peft_config(inner), adapter_name=first)
            for name in others:
                self.peft_model.add_adapter(name, self.peft_config(inner))
        except (ValueError, TypeError, KeyError) as e:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in inner.named_modules()
                    if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
                }
            )
            options = self.config.model_dump(exclude={"name", "lr"}, exclude_defaults=True)
            raise StrategyError(
                f"strategy {self.name}{options or ''}: could not be applied to this model ({str(e).strip(' .')}). "
                f"Linear layers in this model: {', '.join(linear)}"
            ) from None
        return self.peft_model

    def own_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [item for adapter in self.adapters for item in self.adapter_parameters(adapter)]

    def adapter_parameters(self, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters of one PEFT adapter, found by asking the modules."""
        pm = self.peft_model
        if pm.peft_config[adapter].is_prompt_learning:
            return list(pm.prompt_encoder[adapter].named_parameters())
        own = []
        for mname, module in pm.named_modules():
            if isinstance(module, BaseTunerLayer):
                for attr in module.adapter_layer_names:
                    holder = getattr(module, attr, None)
                    if holder is not None and adapter in holder:
                        sub = holder[adapter]
                        params = [("", sub)] if isinstance(sub, torch.nn.Parameter) else sub.named_parameters()
                        own += [(f"{mname}.{attr}.{n}".rstrip("."), p) for n, p in params]
            elif isinstance(module, ModulesToSaveWrapper):
                own += [(f"{mname}.{n}", p) for n, p in module.modules_to_save[adapter].named_parameters()]
        return own

    def select_task(self, model: torch.nn.Module, name: str) -> None:
        """PEFT's ``set_adapter(task)``: on the wrapper of a prompt learner, on each tuner layer (and trained
        module copy) of a tuner, the layers ``PeftModel.set_adapter`` itself switches; done on the model,
        so a model read back from disk, where PEFT wrappers may nest, is routed the same way."""
        if not self.per_task:
            return
        if self.declare(self.config).phase is Phase.PROMPT:
            wrapper = model
            while isinstance(wrapper, PeftModel):
                if name in wrapper.peft_config and wrapper.peft_config[name].is_prompt_learning:
                    wrapper.set_adapter(name, inference_mode=not model.training)
                    return
                wrapper = wrapper.get_base_model()
        else:
            layers = [
                m
                for m in model.modules()
                if isinstance(m, BaseTunerLayer | ModulesToSaveWrapper) and self._holds(m, name)
            ]
            for m in layers:  # training: the task's adapter trains, the others' are frozen
                m.set_adapter(name, inference_mode=not model.training)
            if layers:
                return
        raise StrategyError(f"strategy {self.name}: no adapter for task {name!r}")

    @staticmethod
    def _holds(module: torch.nn.Module, name: str) -> bool:
        if isinstance(module, ModulesToSaveWrapper):
            return name in module.modules_to_save
        return any(name in (getattr(module, attr, None) or {}) for attr in module.adapter_layer_names)

    @classmethod
    def distributed_problem(cls, config, mode):
        if mode == "fsdp" and cls.declare(config).phase is Phase.PROMPT:
            # measured (peft 0.21, accelerate 1.15): get_peft_model_state_dict runs the prompt encoder's
            # embedding on the sharded weight, "aten.embedding.default got mixed torch.Tensor and DTensor"
            return (
                "accelerate writes a prompt learner's sharded checkpoint by running its prompt encoder outside "
                "the forward pass, which fails on a sharded weight (use ddp)"
            )
        return None

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        """A prompt learner: its wrapper's ``disable_adapter()`` (no virtual tokens); a tuner: every tuner
        layer off (one PEFT tuner per run, so every such layer is this strategy's)."""
        if self.declare(self.config).phase is Phase.PROMPT:
            wrapper = model
            while isinstance(wrapper, PeftModel):
                if wrapper.peft_config[wrapper.active_adapter].is_prompt_learning:
                    with wrapper.disable_adapter():
                        yield
                    return
                wrapper = wrapper.get_base_model()
            yield
            return
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        self.peft_model.save_pretrained(out_dir)  # per task: PEFT writes each named adapter to out_dir/<name>/
        if self.per_task:
            (out_dir / TASKS_FILE).write_text(json.dumps(self.adapters))

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        if not (out_dir / TASKS_FILE).is_file():
            return PeftModel.from_pretrained(unwrap(base_model), out_dir)
        first, *others = json.loads((out_dir / TASKS_FILE).read_text())
        model = PeftModel.from_pretrained(unwrap(base_model), out_dir / first, adapter_name=first)
        for name in others:
            model.load_adapter(out_dir / name, adapter_name=name)
        return model


class PeftMerge(Mergeable):
    """PEFT tuners whose updates fold into the weights (LoRA, IA3, other layer-injecting methods)."""

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.merge_and_unload()
