"""Any other PEFT method by its PEFT config: ``{name: peft, type: loha, r: 8, target_modules: all-linear}``.

``type`` is a PEFT method (``loha``, ``lokr``, ``adalora``, ``oft``, ``boft``, ``vera``, ``fourierft``, ... —
whatever the installed PEFT registers); every other key is passed to that method's config class and
checked against its fields, so a misspelled option fails at validation. ``task_type`` is set to
CAUSAL_LM. Users are never limited to the methods tunelab wraps by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from tunelab.strategies.base import Adds, Declaration, PerTaskConfig, Phase, register_strategy
from tunelab.strategies.peft_base import PeftMerge, PeftStrategy


def peft_config_class(kind: str):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    mapping = {str(getattr(k, "value", k)).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind.lower() not in mapping:
        raise ValueError(f"type: unknown PEFT method '{kind}'; this PEFT has: {', '.join(sorted(mapping))}")
    return mapping[kind.lower()]


class PeftAnyConfig(PerTaskConfig):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    type: str = Field(description="PEFT method name, e.g. loha, lokr, adalora, vera, oft.")

    @model_validator(mode="after")
    def _options_match_peft(self):
        cls = peft_config_class(self.type)
        fields = {f.name for f in dataclasses.fields(cls)} - {"peft_type", "task_type"}
        unknown = sorted(set(self.options()) - fields)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for PEFT {cls.__name__}; allowed: {', '.join(sorted(fields))}"
            )
        return self

    def options(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


@register_strategy
class PeftAny(PeftStrategy, PeftMerge):
    name = "peft"
    summary = "Any other PEFT method by its PEFT config (LoHa, LoKr, VeRA, OFT, ...)."
    Config = PeftAnyConfig
    default_lr = 2e-4

    @classmethod
    def declare(cls, config) -> Declaration:
        """A tuner or a prompt learner by its PEFT type; LoRA's relatives add LoRA layers."""
        from peft.tuners.lora import LoraConfig

        peft_cls = peft_config_class(config.type)
        return dataclasses.replace(
            cls.declares,
            phase=Phase.PROMPT if peft_cls().is_prompt_learning else Phase.TUNER,
            adds=frozenset({Adds.LORA_LAYERS}) if issubclass(peft_cls, LoraConfig) else frozenset(),
        )

    def peft_config(self, model):
        return peft_config_class(self.config.type)(task_type="CAUSAL_LM", **self.config.options())
