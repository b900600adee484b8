"""training.lora_kernel: a LoRA layer trained as one autograd operation gives PEFT's outputs and gradients, draws
its dropout as nn.Dropout does, and hands every state it does not cover to PEFT's own forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import final_weights, logged_losses, tiny_config
from tunelab.lorakernel import LoraLinear, fusing, resolve
from tunelab.run import RunError, train


def _model(seed: int = 0, *, bias: bool = False, **lora):
    """A 2-layer Llama (biases on every projection with ``bias``) under PEFT LoRA on every linear layer, B
    moved off zero so that every adapter has a gradient path of its own."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=bias,
        mlp_bias=bias,
    )
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **lora}
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(**options, bias="all" if bias else "none"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, fused: bool, *, autocast: bool = False, seed: int = 1):
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    with fusing(model, fused) as n, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return n, loss.detach(), grads


def _rel_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout-mask"])
def test_the_function_has_the_gradients_of_its_formula(dropout):
    """float64 finite differences, with a base bias that trains and a fixed dropout mask."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)

    x, weight, bias, a, b = t(2, 3, 5), t(4, 5, grad=False), t(4), t(2, 5), t(4, 2)
    keep = torch.rand(2, 3, 5, generator=g) > 0.3 if dropout else None
    p = 0.3 if dropout else 0.0

    def f(x, bias, a, b):
        return LoraLinear.apply(x, x.detach(), keep, p, weight, bias, a, b, 1.7, torch.float64)

    assert torch.autograd.gradcheck(f, (x, bias, a, b))
    drop = keep / (1 - p) if dropout else 1.0
    expected = x @ weight.t() + bias + 1.7 * ((x * drop) @ a.t()) @ b.t()
    torch.testing.assert_close(f(x, bias, a, b), expected)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "trained-biases"])
def test_fused_layers_give_peft_loss_and_gradients_in_fp32(bias):
    model = _model(bias=bias)
    n_peft, l_peft, g_peft = _loss_and_grads(model, False)
    n_fused, l_fused, g_fused = _loss_and_grads(model, True)
    assert (n_peft, n_fused) == (0, 14)  # 7 projections in each of 2 layers
    torch.testing.assert_close(l_fused, l_peft, rtol=1e-6, atol=1e-6)
    assert g_fused.keys() == g_peft.keys()
    assert any(".bias" in k for k in g_peft) == bias
    for k in g_peft:
        torch.testing.assert_close(g_fused[k], g_peft[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fused_layers_under_bf16_autocast_stay_as_close_to_fp32_as_peft():
    """Under autocast the adapter's product is added before the bf16 rounding, not after: the gradients
    move from PEFT's by bf16 rounding, and no further from the fp32 ones than PEFT's."""
    model = _model()
    _, l32, g32 = _loss_and_grads(model, False)
    _, l_peft, g_peft = _loss_and_grads(model, False, autocast=True)
    _, l_fused, g_fused = _loss_and_grads(model, True, autocast=True)
    assert abs(float(l_fused - l32)) <= max(abs(float(l_peft - l32)), 1e-4)
    assert _rel_err(g_fused, g32) <= 1.5 * _rel_err(g_peft, g32)
    assert _rel_err(g_fused, g_peft) < 0.1


def test_dropout_draws_a_bernoulli_mask_on_the_adapter_input_only():
    """Training mode: the adapter reads x * keep / (1 - p), keep drawn as nn.Dropout draws it; the base layer
    reads x. Evaluation mode: no dropout."""
    model = _model(lora_dropout=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32, requires_grad=True)
    with fusing(model, True):
        torch.manual_seed(7)
        y = layer(x)
    torch.manual_seed(7)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.5)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + ((x * keep / 0.5) @ a.t()) @ b.t() * layer.scaling["default"]
    torch.testing.assert_close(y, expected)
    (gy,) = torch.autograd.grad(y.sum(), x)
    (ge,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gy, ge)
    assert not torch.equal(keep, torch.ones_like(keep))
    model.eval()
    with fusing(model, True), torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ a.t()) @ b.t() * layer.scaling["default"])


def test_states_it_does_not_cover_run_pefts_forward():
    """Disabled or merged adapters, a LoRA variant (DoRA) and hooks on the adapter's parts are PEFT's path:
    the same outputs as without the fused forward, bit for bit, and the hooks run."""
    x = torch.randn(2, 5, 32)

    def out(model, fused):
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        with fusing(model, fused), torch.no_grad():
            return layer(x)

    model = _model()
    with model.disable_adapter():
        assert torch.equal(out(model, True), out(model, False))
    model.merge_adapter()
    assert torch.equal(out(model, True), out(model, False))
    model.unmerge_adapter()
    dora = _model(use_dora=True)
    assert torch.equal(out(dora, True), out(dora, False))
    seen = []
    model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].register_forward_hook(
        lambda m, i, o: seen.append(o.shape)
    )
    assert torch.equal(out(model, True), out(model, False))
    assert seen == [torch.Size([2, 5, 4])] * 2


def test_the_layers_get_pefts_forward_back():
    model = _model()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    with fusing(model, True) as n:
        assert n == len(layers) == 14
        assert all("forward" in m.__dict__ for m in layers)
    assert not any("forward" in m.__dict__ or "_tunelab_cast" in m.__dict__ for m in layers)


def test_resolve_says_why_auto_stays_with_peft():
    model = _model()

    def training(**kw):
        return SimpleNamespace(**{"lora_kernel": "auto", "compile": "auto", **kw})

    why: dict[str, str] = {}
    assert resolve(training(), model, sharded=None, why=why) == "fused"  # compile: auto
    assert resolve(training(compile="on"), model, sharded=None, why=why) == "peft"
    assert "inductor" in why.pop("lora_kernel")
    assert resolve(training(), model, sharded="fsdp", why=why) == "peft"
    assert "fsdp" in why.pop("lora_kernel")
    assert resolve(training(lora_kernel="peft"), model, sharded=None, why=why) == "peft"
    assert why == {}


def test_training_fused_matches_peft_and_a_full_run_refuses_fused(tiny_llama, memo_data, tmp_path):
    runs = {}
    for kernel in ("fused", "peft"):
        strategy = {"name": "lora", "dropout": 0.0}
        runs[kernel] = train(
            tiny_config(tiny_llama, memo_data, tmp_path / kernel, strategy, max_steps=6, lora_kernel=kernel)
        )
        assert runs[kernel].summary["levers"]["lora_kernel"] == kernel
    losses = {k: logged_losses(r.run_dir) for k, r in runs.items()}
    assert len(losses["fused"]) >= 3
    assert losses["fused"] == pytest.approx(losses["peft"], rel=1e-4)
    w1, w2 = final_weights(runs["peft"].run_dir), final_weights(runs["fused"].run_dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)

    auto = train(tiny_config(tiny_llama, memo_data, tmp_path / "full", "full", max_steps=1))
    assert auto.summary["levers"]["lora_kernel"] == "peft"
    assert auto.summary["levers"]["why"]["lora_kernel"] == "the model has no LoRA layer over a plain linear layer"
    with pytest.raises(RunError, match="training.lora_kernel: fused cannot be used here: the model has no LoRA"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "refused", "full", max_steps=1, lora_kernel="fused"))
