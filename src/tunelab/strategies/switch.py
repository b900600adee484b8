"""Turning every added module off at once, to get the base model's outputs from an adapted model.

Applies to what adds modules or virtual tokens (PEFT tuners and prompt learners, bottleneck adapters),
not to strategies that change base weights (full, layer-wise). Used to score against the untouched base
without loading a second copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from tunelab.strategies.adapters import BottleneckAdapter


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    with ExitStack() as stack:
        wrapper = model
        while isinstance(wrapper, PeftModel):
            if wrapper.peft_config[wrapper.active_adapter].is_prompt_learning:
                stack.enter_context(wrapper.disable_adapter())
            wrapper = wrapper.get_base_model()
        tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
        bottlenecks = [m for m in model.modules() if isinstance(m, BottleneckAdapter) and m.enabled]
        for m in tuners:
            m.enable_adapters(False)
        for m in bottlenecks:
            m.enabled = False
        try:
            yield model
        finally:
            for m in tuners:
                m.enable_adapters(True)
            for m in bottlenecks:
                m.enabled = True
