"""Method-specific properties beyond the shared matrix: closed forms, initialisation, schedules."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from conftest import tiny_config
from tunelab.config import load_config
from tunelab.models import load_model
from tunelab.run import RunError, load_run, merge, train
from tunelab.strategies import StrategyError, build_strategies, mark_trainable
from tunelab.strategies.adapters import AdaptersConfig, expected_parameters


def build(model, spec):
    strategies = build_strategies(load_config({"data": {"train": "x"}, "strategy": spec}).strategy)
    for s in strategies:
        model = s.apply(model)
    counts = mark_trainable(model, strategies)
    return model, strategies, counts


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_adapters_start_as_the_base_model_and_count_matches_the_closed_form(placement, tiny_model):
    base = load_model(tiny_model)
    reference = logits(base, IDS)
    spec = {"name": "adapters", "placement": placement, "reduction_factor": 4, "activation": "gelu"}
    model, _, counts = build(base, spec)
    assert torch.equal(logits(model, IDS), reference)  # zero-initialised up-projection
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    expected = expected_parameters(
        hidden, layers, AdaptersConfig(name="adapters", placement=placement, reduction_factor=4)
    )
    # m = 32 / 4 = 8: per adapter 2*32*8 + 8 + 32 = 552; houlsby has two per block
    assert expected == 2 * {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[placement] * 552
    assert counts == {"adapters": expected}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_adapters_cannot_be_merged(tiny_llama, memo_data, tmp_path):
    run = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", {"name": "adapters"}, max_steps=2)).run_dir
    with pytest.raises(RunError, match="adapters cannot be folded into the weights"):
        merge(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_peft_pass_through_trains_any_peft_method_and_saves_a_peft_adapter(tiny_llama, memo_data, tmp_path):
    spec = {"name": "peft", "type": "loha", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    run = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", spec, max_steps=4)).run_dir
    assert (run / "model" / "adapter_config.json").is_file()
    plain = PeftModel.from_pretrained(load_model(tiny_llama), run / "model")
    assert torch.equal(logits(plain, IDS), logits(load_run(run).model, IDS))


def test_peft_pass_through_on_an_unsupported_layer_type_is_a_clear_error(tiny_gpt2, memo_data, tmp_path):
    spec = {"name": "peft", "type": "loha", "r": 4, "target_modules": ["c_attn"]}
    with pytest.raises(StrategyError, match="could not be applied to this model.*Conv1D"):
        train(tiny_config(tiny_gpt2, memo_data, tmp_path / "run", spec, max_steps=2))


def test_layerwise_selects_blocks_kinds_and_extras(tiny_llama):
    model, (s,), counts = build(load_model(tiny_llama), {"name": "layerwise", "blocks": [-1], "kinds": ["mlp"]})
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.1.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}
    assert s.describe(model) == "layerwise trains blocks 1 of 2 (mlp): 6,144 parameters"
    model, (s,), _ = build(
        load_model(tiny_llama),
        {
            "name": "layerwise",
            "blocks": ["0-1"],
            "embeddings": True,
            "final_norm": True,
            "patterns": [r"\.o_proj\."],
        },
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert frozen == set()  # every block, embeddings, final norm: the whole tiny model


def test_layerwise_learning_rate_decay_per_block(tiny_llama):
    spec = {"name": "layerwise", "top": 2, "lr_decay": 0.5, "embeddings": True, "head": True}
    model, (s,), _ = build(load_model(tiny_llama), spec)
    groups = {g["name"]: g["lr"] for g in s.param_groups(model, 1e-3)}
    # the tied head is the embedding matrix: it trains at the top rate, once
    assert groups == {"layerwise/top": 1e-3, "layerwise/block1": 1e-3, "layerwise/block0": 5e-4}


def test_frozen_lower_blocks_get_no_gradient(tiny_llama):
    model, _, _ = build(load_model(tiny_llama), {"name": "layerwise", "top": 1})
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.0." in n or "embed" in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.1." in n)


@pytest.mark.parametrize("schedule", [{"unfreeze_every_steps": 3}, {"unfreeze_every_epoch": True}])
def test_gradual_unfreezing_adds_one_block_group_on_schedule(schedule, tiny_llama, memo_data, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            blocks = {
                int(n.split("layers.")[1].split(".")[0])
                for n, p in model.named_parameters()
                if p.requires_grad and "layers." in n
            }
            seen.append(sorted(blocks))

    # 16 rows / batch 4: an epoch is 4 steps
    spec = {"name": "layerwise", "top": 2, **schedule}
    train(tiny_config(tiny_llama, memo_data, tmp_path / "run", spec, max_steps=8), callbacks=[Watch()])
    first = 3 if "unfreeze_every_steps" in schedule else 4  # steps in the first stage
    assert seen[:first] == [[1]] * first  # the top block alone
    assert seen[first:] == [[0, 1]] * (8 - first)  # then the next block joins


def test_hybrid_summary_lists_each_component(tiny_llama, memo_data, tmp_path):
    spec = [{"name": "prefix", "num_virtual_tokens": 4}, {"name": "lora", "r": 4}]
    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", spec, max_steps=2)).summary
    comps = s["parameters"]["components"]
    assert set(comps) == {"prefix", "lora"} and all(v > 0 for v in comps.values())
    assert comps["prefix"] == 2 * 4 * 2 * 16  # layers x tokens x (key, value) x kv width (2 heads of 8)
    # each component is its own PEFT adapter directory
    assert (tmp_path / "run" / "model" / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "model" / "prefix" / "adapter_config.json").is_file()


def _renamed(module: torch.nn.Module, name: str) -> None:
    """Give ``module`` a class of another name (same behaviour): the names tunelab must not rely on."""
    module.__class__ = type(name, (type(module),), {})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_module_roles_are_asked_of_the_model_not_read_from_class_names(arch, tiny_llama, tiny_gpt2):
    from tunelab.strategies.anatomy import role, transformer_blocks

    model = load_model(tiny_llama if arch == "llama" else tiny_gpt2)
    for block in transformer_blocks(model):
        for child in block.children():
            _renamed(child, "Mixer")  # no Attention, MLP or Norm in any name
    block = transformer_blocks(model)[0]
    roles = sorted(r for c in block.children() if (r := role(c)))
    assert roles == ["attention", "mlp", "norms", "norms"]
    # layer-wise kinds and adapters find the same parts through the roles
    _, (s,), counts = build(model, {"name": "layerwise", "blocks": [-1], "kinds": ["attention"]})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".attn." in n or ".self_attn." in n for n in trained)
    with_adapters, _, counts = build(load_model(tiny_llama), {"name": "adapters", "placement": "houlsby"})
    renamed = load_model(tiny_llama)
    for b in transformer_blocks(renamed):
        for child in b.children():
            _renamed(child, "Mixer")
    _, _, renamed_counts = build(renamed, {"name": "adapters", "placement": "houlsby"})
    assert renamed_counts == counts


def test_a_module_that_answers_nothing_falls_back_to_its_class_name():
    from tunelab.strategies.anatomy import role

    class CustomAttention(torch.nn.Module):  # no head attributes: the name is all there is
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(4, 4)

    class Gate(torch.nn.Module):  # one matrix, no name pattern: no role
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Linear(4, 4)

    assert role(CustomAttention()) == "attention"
    assert role(Gate()) is None
    assert role(torch.nn.LayerNorm(4)) == "norms"


def test_dropout_on_an_attention_it_cannot_set_is_refused(tiny_llama):
    from tunelab.strategies.anatomy import transformer_blocks

    model = load_model(tiny_llama)
    for block in transformer_blocks(model):
        del block.self_attn.attention_dropout  # an attention without a rate tunelab knows how to set
    with pytest.raises(StrategyError, match="dropout.attention: the attention of .* would do nothing"):
        build(model, ["lora", {"name": "dropout", "attention": 0.1}])
    build(load_model(tiny_llama), ["lora", {"name": "dropout", "attention": 0.1}])  # Llama's is set
