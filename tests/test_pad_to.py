"""training.pad_to: ``bucket`` pads each training batch up to one of a few lengths, so batch shapes repeat from
step to step; the padding carries no loss and no attention, so training computes what padding to the longest
row computes."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import tunelab.data
from conftest import final_weights, tiny_config
from tunelab.data import BUCKET_FROM, IGNORE, Collator, bucket_length
from tunelab.run import train


def test_bucket_length_adds_at_most_a_sixteenth_from_128_tokens_and_gives_few_lengths():
    for n in range(BUCKET_FROM):
        assert bucket_length(n) == n  # short batches stay at their longest row
    for n in range(BUCKET_FROM, 5000):
        assert n <= bucket_length(n) < n + max(8, n // 16 + 1), n
    assert {bucket_length(n) for n in range(53, 62)} == {56, 64}  # the bench's short rows: 2 lengths, not 9
    assert len({bucket_length(n) for n in range(64 + 1, 129)}) == 8  # multiples of 8 up to 128
    for k in range(7, 13):  # then 16 lengths per doubling
        assert len({bucket_length(n) for n in range(2**k + 1, 2 ** (k + 1) + 1)}) == 16
    assert bucket_length(530) == 544 and bucket_length(530, cap=540) == 540  # never over max_length
    assert bucket_length(600, cap=512) == 600  # nor under the row


def test_collator_bucket_pads_further_with_no_loss_and_no_attention():
    rows = [{"input_ids": [5] * n, "labels": [7] * n} for n in (115, 97)]
    exact, bucketed = Collator(0)(rows), Collator(0, bucket=True, cap=512)(rows)
    assert exact["input_ids"].shape == (2, 115) and bucketed["input_ids"].shape == (2, 120)
    for k in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(bucketed[k][:, :115], exact[k]), k
    assert (bucketed["input_ids"][:, 115:] == 0).all()
    assert (bucketed["labels"][:, 115:] == IGNORE).all() and (bucketed["attention_mask"][:, 115:] == 0).all()


class _Lengths(TrainerCallback):
    """The sequence length of every batch the model's forward sees during training."""

    def __init__(self):
        self.seen: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        emb = model.get_input_embeddings()
        emb.register_forward_pre_hook(lambda m, a: self.seen.append(a[0].shape[1]) if m.training else None)


def test_bucket_batches_train_what_longest_ones_train_and_auto_buckets(
    tiny_llama, uneven_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(tunelab.data, "BUCKET_FROM", 8)  # the tiny rows are shorter than the real threshold
    runs, lengths = {}, {}
    for pad_to in ("auto", "longest"):
        cb = _Lengths()
        # no dropout: its random draws follow the batch's shape, so padded batches draw other masks
        lora = {"name": "lora", "dropout": 0.0}
        cfg = tiny_config(tiny_llama, uneven_data, tmp_path / pad_to, lora, max_steps=6, pad_to=pad_to)
        runs[pad_to], lengths[pad_to] = train(cfg, callbacks=[cb]), cb.seen
    assert runs["auto"].summary["levers"]["pad_to"] == "bucket"
    assert runs["longest"].summary["levers"]["pad_to"] == "longest"
    # the rows' own lengths are not all on the grid (the check below would pass without padding otherwise)
    assert any(n != bucket_length(n, 64) for n in lengths["longest"])
    assert lengths["auto"] and all(n == bucket_length(n, 64) for n in lengths["auto"])
    assert len(set(lengths["auto"])) < len(set(lengths["longest"]))
    # the same tokens trained on: the padding is not counted, and the weights are the same to rounding
    tokens = [r.summary["train"]["tokens_seen"] for r in runs.values()]
    assert tokens[0] == tokens[1]
    w1, w2 = final_weights(runs["longest"].run_dir), final_weights(runs["auto"].run_dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert runs["auto"].summary["eval"]["loss"] == pytest.approx(runs["longest"].summary["eval"]["loss"], rel=1e-5)
