"""What autograd keeps for backward (tunelab.saved). training.weight_casts: ``recompute`` keeps a reference to
each trained weight instead of its bf16 copy for backward and casts it again there; training.activations:
``lean`` keeps how to compute an element-wise output again instead of the output, and the casts of one tensor
once. Either way the same gradients, bit for bit, for less kept."""

from __future__ import annotations

import pytest
import torch

from conftest import final_weights, tiny_config
from tunelab import saved
from tunelab.models import load_model
from tunelab.run import RunError, train


def _kept_bytes_and_grads(model, ids, recast: bool = False, lean: bool = False, autocast: bool = True):
    """One step (under bf16 autocast, or in fp32): the bytes autograd keeps for backward (storages other than
    the parameters'), and the gradients."""
    kept = {}
    packer = saved._packer(recast, lean)

    def pack(t):
        x = packer(t)
        if isinstance(x, torch.Tensor):
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, saved._unpack):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast, cache_enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(b for ptr, b in kept.items() if ptr not in params), {
        n: p.grad.clone() for n, p in model.named_parameters()
    }


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_recompute_keeps_no_weight_copy_and_gives_the_same_gradients(tiny_llama):
    model = load_model(tiny_llama)
    kept_copies, grads_kept = _kept_bytes_and_grads(model, _ids(model))
    kept_refs, grads_recast = _kept_bytes_and_grads(model, _ids(model), recast=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert kept_copies - kept_refs >= 2 * linear  # every linear weight's bf16 copy (the tied head's included)
    for n, g in grads_kept.items():
        assert torch.equal(grads_recast[n], g), n


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_lean_activations_keep_less_and_give_the_same_gradients(tiny_llama, autocast):
    """Every layer's SiLU output and gated product (bf16 under autocast, fp32 without) and, the norms' weights
    training, both norms' normalised inputs (fp32): computed again in backward instead of kept. Under autocast
    the query, key and value projections' bf16 casts of their input are kept once (two copies less), and the
    gate and up projections' (one less)."""
    model = load_model(tiny_llama)
    ids = _ids(model)
    kept, grads_kept = _kept_bytes_and_grads(model, ids, autocast=autocast)
    lean, grads_lean = _kept_bytes_and_grads(model, ids, lean=True, autocast=autocast)
    both, grads_both = _kept_bytes_and_grads(model, ids, recast=autocast, lean=True, autocast=autocast)
    c, tokens = model.config, ids.numel()
    mlp = 2 * tokens * c.intermediate_size * (2 if autocast else 4)  # SiLU's output, the gated product
    norms = 2 * tokens * c.hidden_size * 4
    casts = 3 * tokens * c.hidden_size * 2 if autocast else 0
    assert kept - lean >= c.num_hidden_layers * (mlp + norms + casts)
    assert both < lean or not autocast  # the two levers together keep less than either
    for n, g in grads_kept.items():  # the same kernels on the same inputs: the same values
        assert torch.equal(grads_lean[n], g), n
        assert torch.equal(grads_both[n], g), n


def test_full_training_with_recompute_trains_the_same_weights_and_keep_is_the_default(
    tiny_llama, memo_data, tmp_path
):
    runs = {
        c: train(tiny_config(tiny_llama, memo_data, tmp_path / c, "full", max_steps=4, precision="bf16", **kw))
        for c, kw in (("recompute", {"weight_casts": "recompute"}), ("default", {}))
    }
    assert runs["recompute"].summary["levers"]["weight_casts"] == "recompute"
    assert runs["default"].summary["levers"]["weight_casts"] == "keep"
    w1, w2 = final_weights(runs["default"].run_dir), final_weights(runs["recompute"].run_dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0, msg=k)


def test_activations_auto_is_lean_and_trains_the_same_weights(tiny_llama, memo_data, tmp_path, monkeypatch):
    unpacked = []

    def unpack(x):  # the real unpacking, noting what was computed again or shared
        unpacked.append(x[0][0] if isinstance(x, tuple) else "kept")
        return unpack_for_real(x)

    unpack_for_real = saved._unpack
    monkeypatch.setattr(saved, "_unpack", unpack)
    runs = {}
    for c, kw in (("keep", {"activations": "keep"}), ("default", {})):
        unpacked.clear()
        lora = {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}  # one input, several casts
        # PEFT's layers cast their input each (the fused ones cast it once themselves: tests/test_lora_kernel.py)
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / c, lora, max_steps=4, precision="bf16", **kw)
        cfg["training"]["lora_kernel"] = "peft"
        runs[c] = train(cfg)
        assert {"op", "same"} <= set(unpacked) if c == "default" else not unpacked, (c, set(unpacked))
    assert runs["default"].summary["levers"]["activations"] == "lean"
    assert runs["keep"].summary["levers"]["activations"] == "keep"
    w1, w2 = final_weights(runs["keep"].run_dir), final_weights(runs["default"].run_dir)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0, msg=k)


def test_weight_casts_recompute_without_casts_is_refused(tiny_llama, memo_data, tmp_path):
    with pytest.raises(
        RunError, match=r"^training.weight_casts: recompute cannot be used here: precision is fp32"
    ):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "fp32", "full", max_steps=1, weight_casts="recompute"))


def test_a_recomputed_output_comes_back_in_the_layout_the_forward_gave_it():
    """A product of column-major factors is column-major; a view saved from it is rebuilt on that layout."""
    a = torch.randn(6, 4, requires_grad=True).t()  # (4, 6), strides (1, 4)
    b = torch.randn(6, 4, requires_grad=True).t()
    y = a * b
    assert y.stride() == (1, 4)
    view = y.t()  # what a later op keeps: (6, 4), strides (4, 1)
    packed = saved._packer(recast=False, lean=True)(view)
    assert isinstance(packed, tuple) and packed[0][0] == "op"
    again = saved._unpack(packed)
    assert torch.equal(again, view) and again.stride() == view.stride()
