"""Data shapes, exact loss masks, bad rows, batching."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from tunelab.config import DataConfig
from tunelab.data import IGNORE, Collator, DataError, prepare_file, prepare_splits, read_rows


def trained_text(tok, feats) -> str:
    """The text of exactly the tokens that carry loss."""
    return tok.decode([t for t, lab in zip(feats["input_ids"], feats["labels"], strict=True) if lab != IGNORE])


def prep(tmp_path, tok, rows, max_length=128, **data):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return prepare_file(path, tok, DataConfig(train=str(path), **data), max_length)


def test_text_rows_train_on_every_token(tmp_path, tok):
    p = prep(tmp_path, tok, [{"text": "the cat sat on the mat"}])
    f = p.features[0]
    assert p.format == "text"
    assert f["labels"] == f["input_ids"]
    assert tok.decode(f["input_ids"]) == "the cat sat on the mat<|im_end|>"
    assert p.references == [None]


def test_prompt_completion_chat_masks_exactly_the_answer_and_end_of_turn(tmp_path, tok):
    p = prep(tmp_path, tok, [{"prompt": "what is the colour of the sky ?", "completion": "blue"}])
    f = p.features[0]
    assert p.format == "prompt_completion"
    full = tok.decode(f["input_ids"])
    assert (
        full
        == "<|im_start|>user\nwhat is the colour of the sky ?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n"
    )
    assert trained_text(tok, f) == "blue<|im_end|>\n"
    # the prompt used for scoring ends with the generation prompt, and the reference is the completion
    assert p.prompts[0][0].endswith("<|im_start|>assistant\n")
    assert p.references == ["blue"]


def test_prompt_completion_plain_template(tmp_path, tok):
    p = prep(tmp_path, tok, [{"prompt": "one two ", "completion": "three"}], template="plain")
    f = p.features[0]
    assert tok.decode(f["input_ids"]) == "one two three<|im_end|>"
    # BPE merges the prompt's trailing space with the answer (" three"): that token carries answer
    # characters, so it trains; nothing before it does.
    assert trained_text(tok, f) == " three<|im_end|>"


def test_train_on_all_tokens(tmp_path, tok):
    p = prep(tmp_path, tok, [{"prompt": "one two ", "completion": "three"}], template="plain", train_on="all")
    assert p.features[0]["labels"] == p.features[0]["input_ids"]


def test_messages_train_on_every_assistant_turn_only(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "what is one"},
        {"role": "assistant", "content": "one"},
    ]
    p = prep(tmp_path, tok, [{"messages": msgs}])
    f = p.features[0]
    assert p.format == "messages"
    assert trained_text(tok, f) == "hello world<|im_end|>\none<|im_end|>\n"
    assert p.references == ["one"]
    assert p.prompts[0][0].endswith("what is one<|im_end|>\n<|im_start|>assistant\n")


def test_classification_rows_train_on_the_label_and_list_the_label_set(tmp_path, tok):
    rows = [{"text": "good movie", "label": "positive"}, {"text": "bad book", "label": "negative"}]
    p = prep(tmp_path, tok, rows)
    assert p.format == "classification"
    assert p.labels == ["negative", "positive"]
    assert trained_text(tok, p.features[0]) == "positive<|im_end|>\n"
    assert "Answer with one of: negative, positive." in tok.decode(p.features[0]["input_ids"])


def test_system_prompt_is_added_to_chat_rows(tmp_path, tok):
    p = prep(tmp_path, tok, [{"prompt": "hello", "completion": "yes"}], system_prompt="be brief")
    assert tok.decode(p.features[0]["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert trained_text(tok, p.features[0]) == "yes<|im_end|>\n"


def test_column_mapping(tmp_path, tok):
    p = prep(tmp_path, tok, [{"q": "hello", "a": "yes"}], columns={"prompt": "q", "completion": "a"})
    assert p.format == "prompt_completion" and p.references == ["yes"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hello"}, "missing field 'completion'"),
        ({"prompt": "hello", "completion": 3}, "field 'completion' must be a string"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, tok, row, message):
    rows = [{"prompt": "a", "completion": "b"}, row]
    with pytest.raises(DataError) as e:
        prep(tmp_path, tok, rows)
    assert f"d.jsonl:2: {message}" in str(e.value)
    assert "skip_bad_rows" in str(e.value)


def test_bad_messages_rows(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
    ]
    with pytest.raises(DataError, match=r"d.jsonl:2: messages\[0\].role is 'robot'"):
        prep(tmp_path, tok, rows)


def test_skip_bad_rows_counts_them(tmp_path, tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c"}, {"prompt": "d", "completion": None}]
    p = prep(tmp_path, tok, rows, skip_bad_rows=True)
    assert (p.stats.rows, p.stats.used, p.stats.skipped) == (3, 1, 2)
    assert p.stats.reasons[0].endswith("d.jsonl:2: missing field 'completion'")


def test_row_with_no_trainable_token_after_truncation(tmp_path, tok):
    rows = [{"prompt": "one two three four five " * 10, "completion": "yes"}]
    with pytest.raises(DataError, match="no trainable token after truncation to training.max_length=16"):
        prep(tmp_path, tok, rows, max_length=16)


def test_malformed_json_line_is_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        read_rows(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "x.txt")


def test_csv_json_and_parquet_load_the_same_rows(tmp_path, tok):
    import pandas as pd

    rows = [{"prompt": "hello", "completion": "yes"}, {"prompt": "what", "completion": "no"}]
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for ext in ("csv", "parquet", "json"):
        assert read_rows(tmp_path / f"d.{ext}") == rows


def test_eval_split_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q {i}", "completion": str(i)} for i in range(20)])
    cfg = DataConfig(train=str(path), eval_split=0.25)
    tr1, ev1 = prepare_splits(cfg, tok, 64, seed=1)
    tr2, ev2 = prepare_splits(cfg, tok, 64, seed=1)
    assert len(ev1.features) == 5 and len(tr1.features) == 15
    assert ev1.references == ev2.references
    assert not set(ev1.references) & set(tr1.references)


def test_collator_pads_to_the_longest_row_with_masked_labels():
    batch = Collator(pad_id=3)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
