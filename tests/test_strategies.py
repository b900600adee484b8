"""The behavioural matrix: every strategy x every tiny architecture, checked for the same properties."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import tiny_config
from tunelab.config import load_config
from tunelab.models import load_model
from tunelab.run import RunError, load_run, merge, train
from tunelab.strategies import StrategyError, build_strategies


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.tensor([[1, 50, 60, 70, 80, 90, 2]])


def test_lora_parameter_count_equals_peft(tiny_model):
    opts = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "c_attn"]}
    (s,) = build_strategies(load_config({"data": {"train": "x"}, "strategy": opts}).strategy)
    ours = s.apply(load_model(tiny_model))
    ref = get_peft_model(
        load_model(tiny_model),
        PeftLoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "c_attn"]),
    )
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ours == n_ref > 0
    # and the closed form: r * (d_in + d_out) per adapted layer, over 2 layers
    if "q_proj" in str(ours):
        # llama: q 32->32, v 32->16 (2 kv heads of 8)
        assert n_ours == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_lora_artefact_is_a_plain_peft_adapter(tiny_llama, memo_data, tmp_path, ids):
    result = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=4))
    adapter = result.run_dir / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
    peft_model = PeftModel.from_pretrained(load_model(tiny_llama), adapter)
    assert torch.equal(logits(peft_model, ids), logits(load_run(result.run_dir).model, ids))
    # disabling the adapter gives the base model back
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, ids), logits(load_model(tiny_llama), ids))


def test_merge_equals_unmerged_and_is_standalone(tiny_model, memo_data, tmp_path, ids):
    result = train(tiny_config(tiny_model, memo_data, tmp_path / "run", "lora", max_steps=4))
    out = merge(result.run_dir, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tunelab_config.yaml").is_file()
    merged = load_model(out)
    assert torch.allclose(logits(merged, ids), logits(load_run(result.run_dir).model, ids), atol=1e-5)
    with pytest.raises(RunError, match="not empty"):
        merge(result.run_dir, out)


def test_merge_keeps_the_base_models_dtype_and_writes_readable_files(tiny_llama, memo_data, tmp_path, ids):
    """A bf16 base merges into bf16 weights (not the fp32 copy tunelab trains in), in a directory others can
    read: 0755 / 0644 under the usual umask, not mkdtemp's 0700."""
    import json
    import os

    base = tmp_path / "bf16-base"
    load_model(tiny_llama).to(torch.bfloat16).save_pretrained(base)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja"):
            (base / f.name).write_bytes(f.read_bytes())
    result = train(tiny_config(base, memo_data, tmp_path / "run", "lora", max_steps=2))
    old = os.umask(0o022)
    try:
        out = merge(result.run_dir, tmp_path / "merged")
    finally:
        os.umask(old)
    weights = load_file(out / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}
    run = load_run(result.run_dir)  # the fp32 merge, rounded once to bf16: the same values
    folded = {k: v.to(torch.bfloat16) for k, v in run.stack.merge(run.model).state_dict().items()}
    assert weights.keys() <= folded.keys() and all(torch.equal(weights[k], folded[k]) for k in weights)


def test_merge_of_a_full_run_is_refused(tiny_llama, memo_data, tmp_path):
    result = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "full", max_steps=2))
    with pytest.raises(RunError, match="already a standalone model"):
        merge(result.run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_target_modules_that_match_nothing_is_an_error(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", {"name": "lora", "target_modules": ["nope_proj"]})
    with pytest.raises(
        StrategyError, match="could not be applied.*not found.*Linear layers in this model: .*q_proj"
    ):
        train(cfg)


def test_a_strategy_that_selects_nothing_is_an_error(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(
        tiny_llama, memo_data, tmp_path / "run", {"name": "layerwise", "patterns": ["no_such_param"]}
    )
    with pytest.raises(StrategyError, match="pattern 'no_such_param' matches no parameter"):
        train(cfg)
    cfg = tiny_config(
        tiny_llama, memo_data, tmp_path / "run2", {"name": "layerwise", "top": 1, "kinds": ["norms"]}
    )
    assert train(cfg).summary["parameters"]["trainable"] == 2 * 32  # the block's two RMSNorm weights


def test_dora_and_rslora_switches_reach_peft(tiny_llama):
    opts = {"name": "lora", "r": 4, "alpha": 8, "use_dora": True, "use_rslora": True}
    (s,) = build_strategies(load_config({"data": {"train": "x"}, "strategy": opts}).strategy)
    model = s.apply(load_model(tiny_llama))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA's magnitudes
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)


def test_gradient_checkpointing_trains_the_same_as_without(tiny_llama, memo_data, tmp_path):
    a = train(tiny_config(tiny_llama, memo_data, tmp_path / "a", "lora", max_steps=3)).run_dir
    b = train(
        tiny_config(tiny_llama, memo_data, tmp_path / "b", "lora", max_steps=3, gradient_checkpointing=True)
    ).run_dir
    wa, wb = (
        load_file(a / "model" / "adapter_model.safetensors"),
        load_file(b / "model" / "adapter_model.safetensors"),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def greedy_by_full_forwards(model, ids: torch.Tensor, n: int, eos: int) -> list[int]:
    """Greedy decoding with a full forward per token (no KV cache): what the model itself predicts."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("strategy", ["prefix", "prompt", "ptuning", ["prefix", "lora"]], ids=str)
def test_virtual_token_methods_generate_what_the_model_predicts(strategy, tiny_llama, memo_data, tmp_path):
    # PEFT's generate() drops the virtual tokens after the first step (peft + transformers 5), so tunelab
    # decodes these itself, continuing from the wrapper's cache through the model inside it (which, in the
    # hybrid, holds LoRA's layers): it must give the tokens a greedy loop of full forwards gives, as built
    # and as read back
    from tunelab.evaluate import generate_batch
    from tunelab.models import load_tokenizer
    from tunelab.strategies.stack import StrategyStack

    tok = load_tokenizer(tiny_llama)
    prompts = ["what is the colour of the sky ?", "classify : good movie"]
    run = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", strategy, max_steps=6, lr=5e-2)).run_dir
    torch.manual_seed(0)
    built = StrategyStack(load_config(run / "config.yaml").strategy).apply(load_model(tiny_llama)).eval()
    for model in (built, load_run(run).model):
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            expected = tok.decode(
                greedy_by_full_forwards(model, ids, 12, tok.eos_token_id), skip_special_tokens=True
            )
            assert generate_batch(model, tok, [(p, False)], 12, bf16=False)[0] == expected.strip(), (strategy, p)
