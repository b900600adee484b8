"""training.weight_casts: ``recompute`` keeps a reference to each trained weight instead of its bf16 copy for
backward and casts it again there: the same gradients, a half-size copy of every trained weight less kept."""

from __future__ import annotations

import pytest
import torch

from conftest import final_weights, tiny_config
from tunelab import casts
from tunelab.models import load_model
from tunelab.run import RunError, train


def _kept_bytes_and_grads(model, ids, recompute: bool):
    """One bf16-autocast step: the bytes autograd keeps for backward (storages other than the parameters'),
    and the gradients."""
    kept = {}

    def pack(t):
        x = casts._pack(t) if recompute else t
        if isinstance(x, torch.Tensor):
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, casts._unpack):
        with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(b for ptr, b in kept.items() if ptr not in params), {
        n: p.grad.clone() for n, p in model.named_parameters()
    }


def test_recompute_keeps_no_weight_copy_and_gives_the_same_gradients(tiny_llama):
    model = load_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    kept_copies, grads_kept = _kept_bytes_and_grads(model, ids, recompute=False)
    kept_refs, grads_recast = _kept_bytes_and_grads(model, ids, recompute=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert kept_copies - kept_refs >= 2 * linear  # every linear weight's bf16 copy (the tied head's included)
    for n, g in grads_kept.items():
        assert torch.equal(grads_recast[n], g), n


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


def test_weight_casts_recompute_without_casts_is_refused(tiny_llama, memo_data, tmp_path):
    with pytest.raises(
        RunError, match=r"^training.weight_casts: recompute cannot be used here: precision is fp32"
    ):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "fp32", "full", max_steps=1, weight_casts="recompute"))
