"""Shared code for strategies that PEFT implements: apply, own parameters, save, load, merge.

A PEFT strategy only says which ``peft`` config it builds (``peft_config``). Its own parameters are found
by asking the modules: PEFT tuner layers (``BaseTunerLayer``) list their adapter sub-modules in
``adapter_layer_names``; prompt learners keep theirs in the wrapper's ``prompt_encoder``; modules trained
in full are ``ModulesToSaveWrapper`` copies. Its artefact is exactly what ``PeftModel.save_pretrained``
writes, so ``PeftModel.from_pretrained(base, dir)`` loads it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from tunelab.strategies.base import Phase, Strategy, StrategyError, unwrap


class PeftStrategy(Strategy):
    phase = Phase.TUNER
    adapter = "default"
    mergeable = True

    def peft_config(self, model: torch.nn.Module) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = unwrap(model)
        try:
            self.peft_model = get_peft_model(inner, self.peft_config(inner))
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
        pm = self.peft_model
        if pm.peft_config[self.adapter].is_prompt_learning:
            return list(pm.prompt_encoder[self.adapter].named_parameters())
        own = []
        for mname, module in pm.named_modules():
            if isinstance(module, BaseTunerLayer):
                for attr in module.adapter_layer_names:
                    holder = getattr(module, attr, None)
                    if holder is not None and self.adapter in holder:
                        sub = holder[self.adapter]
                        params = [("", sub)] if isinstance(sub, torch.nn.Parameter) else sub.named_parameters()
                        own += [(f"{mname}.{attr}.{n}".rstrip("."), p) for n, p in params]
            elif isinstance(module, ModulesToSaveWrapper):
                own += [(f"{mname}.{n}", p) for n, p in module.modules_to_save[self.adapter].named_parameters()]
        return own

    @contextmanager
    def disabled(self, model: torch.nn.Module) -> Iterator[None]:
        """A prompt learner: its wrapper's ``disable_adapter()`` (no virtual tokens); a tuner: every tuner
        layer off (one PEFT tuner per run, so every such layer is this strategy's)."""
        if self.phase_of(self.config) is Phase.PROMPT:
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
        self.peft_model.save_pretrained(out_dir)

    @classmethod
    def load(cls, base_model: torch.nn.Module, out_dir: Path) -> torch.nn.Module:
        return PeftModel.from_pretrained(unwrap(base_model), out_dir)

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.merge_and_unload()
