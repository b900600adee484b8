"""GGUF in and out, on the ``gguf`` package (its writer, quantizers and tensor-name map) and transformers'
GGUF loader.

- In (``tunelab.models.resolve_model``): a local ``.gguf`` file as ``model:`` is converted once into a
  safetensors directory under ``TUNELAB_HOME/models/gguf/``, like the default model; any architecture
  transformers' GGUF loader reads.
- Out: :func:`export` writes a Hugging Face Llama-architecture model directory (a merged run, a full
  fine-tune) as one GGUF file for llama.cpp / Ollama: weights in f32, f16, bf16 or q8_0 (norms stay f32),
  the tokenizer (byte-level BPE: tokens, types, merges, special ids) and the chat template. The Q and K
  projections are permuted the way llama.cpp's converter does (and transformers' loader undoes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab.errors import RunError
from tunelab.fsutil import umask

TYPES = ("f32", "f16", "bf16", "q8_0")
EXPORTABLE = ("llama",)  #: model_type values export() writes


def _permute(w, n_head: int, n_kv: int | None):
    """HF's Q/K row order -> llama.cpp's (rotary pairs interleaved), as llama.cpp's convert_hf_to_gguf."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export(model_dir: Path, out: Path, ftype: str = "f16", *, source: Path | str | None = None) -> Path:
    """Write the model in ``model_dir`` (a plain HF directory with safetensors weights) to the GGUF file
    ``out``, atomically (a temporary file beside it, renamed when complete). ``source``: what a refusal
    names (the run directory, when ``model_dir`` is a temporary merge of it); ``model_dir`` by default."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    if ftype not in TYPES:
        raise RunError(f"--type {ftype}: allowed: {', '.join(TYPES)}")
    source = source or model_dir
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") not in EXPORTABLE:
        raise RunError(
            f"{source}: GGUF export writes the {', '.join(EXPORTABLE)} architecture; this model is "
            f"{cfg.get('model_type')!r}"
        )
    tok_file = model_dir / "tokenizer.json"
    tj = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    if tj.get("model", {}).get("type") != "BPE":
        raise RunError(f"{source}: GGUF export needs a byte-level BPE tokenizer.json (as Llama 3 / SmolLM2)")
    arch = gguf.MODEL_ARCH.LLAMA
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    qtype = getattr(gguf.GGMLQuantizationType, ftype.upper())
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[ftype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        w.add_name(model_dir.name)
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(n_layer)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        rope = cfg.get("rope_parameters") or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
        w.add_vocab_size(cfg["vocab_size"])
        w.add_file_type(file_type)
        _add_tokenizer(w, model_dir, tj, cfg["vocab_size"])

        names = gguf.get_tensor_name_map(arch, n_layer)
        weights: dict = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(f))
        for key, tensor in weights.items():
            name = names.get_name(key.removesuffix(".weight"))
            if name is None or not key.endswith(".weight"):
                raise RunError(f"{source}: tensor {key} has no GGUF name for the llama architecture")
            a = tensor.float().numpy()
            if key.endswith("q_proj.weight"):
                a = _permute(a, n_head, n_head)
            elif key.endswith("k_proj.weight"):
                a = _permute(a, n_head, n_kv)
            if a.ndim == 1 or ftype == "f32":
                w.add_tensor(f"{name}.weight", a.astype(np.float32))
            elif ftype == "f16":
                w.add_tensor(f"{name}.weight", a.astype(np.float16))
            else:
                q = gguf.quants.quantize(a, qtype)
                w.add_tensor(f"{name}.weight", q, raw_shape=q.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o666 & ~umask())
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _add_tokenizer(w, model_dir: Path, tj: dict, vocab_size: int) -> None:
    import gguf

    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tj["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for text, i in added.items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])])
    tc_file = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    for key, add in (
        ("bos_token", w.add_bos_token_id),
        ("eos_token", w.add_eos_token_id),
        ("pad_token", w.add_pad_token_id),
    ):
        value = tc.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in added:
            add(added[value])
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())
    elif isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
