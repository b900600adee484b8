"""Prompt-engineering baselines (issue 10, point 1): the untouched model, zero- or few-shot, scored with the
same metrics as a trained run, with no training."""

from __future__ import annotations

import pytest
import torch

from conftest import MEMO_ROWS, tiny_config, write_jsonl
from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.models import load_model
from tunelab.run import evaluate, load_run, train
from tunelab.summary import SUMMARY_VERSION

MEMO_SET = {(r["prompt"], r["completion"]) for r in MEMO_ROWS}


def baseline(model, data, out, shots: int, template: str = "auto") -> dict:
    cfg = tiny_config(model, data, out, {"name": "prompt-only", "shots": shots}, max_length=256)
    cfg["data"]["template"] = template
    return cfg


def test_zero_shot_scores_the_untouched_model_like_a_bare_eval(tiny_llama, memo_data, tmp_path):
    s = train(baseline(tiny_llama, memo_data, tmp_path / "run", 0)).summary
    assert s["summary_version"] == SUMMARY_VERSION == 2 and "train" not in s
    assert s["parameters"]["trainable"] == 0
    bare = evaluate(tiny_llama, memo_data, ["training.max_length=256", "training.precision=fp32"])
    assert s["eval"]["loss"] == pytest.approx(bare["loss"], rel=1e-6)
    assert s["eval"]["exact_match"] == bare["exact_match"]
    assert s["forgetting"]["after"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the base model itself
    # read back: the base model, unchanged; nothing to merge
    run = load_run(tmp_path / "run")
    base = load_model(tiny_llama)
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), base.parameters(), strict=True))
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 2


@pytest.mark.parametrize("template", ["auto", "plain"])
def test_few_shot_shows_training_rows_as_solved_examples(template, tiny_llama, memo_data, tmp_path):
    zero = train(baseline(tiny_llama, memo_data, tmp_path / "zero", 0, template)).summary
    few = train(baseline(tiny_llama, memo_data, tmp_path / "few", 2, template)).summary
    prompt = few["eval"]["samples"][0]["prompt"]
    shown = [(p, c) for p, c in MEMO_SET if p in prompt and c in prompt]
    assert len(shown) >= 1  # training rows (prompt and answer) precede the row's own prompt
    assert prompt.endswith(zero["eval"]["samples"][0]["prompt"])  # the same row, after the examples
    if template == "auto":
        assert prompt.count("<|im_start|>assistant") == 3  # two shown answers, then the turn to generate
    # the loss covers the row's own answer only: as many tokens as zero-shot
    assert few["eval"]["tokens"] == zero["eval"]["tokens"]
    # the same shots for every prompt, drawn with the seed: a second run shows the same ones
    again = train(baseline(tiny_llama, memo_data, tmp_path / "again", 2, template)).summary
    assert again["eval"]["samples"][0]["prompt"] == prompt


def test_a_baseline_runs_alone_in_single_mode(tiny_llama, memo_data, tmp_path):
    base = baseline(tiny_llama, memo_data, tmp_path / "run", 0)
    with pytest.raises(ConfigError, match="combines with no other strategy"):
        load_config({**base, "strategy": [{"name": "prompt-only"}, "lora"]})
    tasks = [{"name": n, "train": str(memo_data), "eval": str(memo_data)} for n in ("a", "b")]
    with pytest.raises(ConfigError, match="mode: single only"):
        load_config({**base, "data": None, "tasks": tasks, "mode": "multitask"})
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2,
    )
    assert main(["train", str(write_cfg(baseline(tiny_llama, chat, tmp_path / "c", 1), tmp_path))]) == 2


def write_cfg(cfg: dict, tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bm25_shows_each_prompt_its_nearest_training_rows_and_system_prompt_replaces_the_datas(
    tiny_llama, tmp_path
):
    from tunelab.data import Shots, prepare_splits
    from tunelab.models import load_tokenizer

    topics = ["kettle", "invoice", "password", "parcel"]
    train_rows = [
        {"prompt": f"my {t} problem number {i}", "completion": f"{t}-{i}"} for t in topics for i in range(3)
    ]
    eval_rows = [{"prompt": f"a {t} question", "completion": t} for t in topics]
    tr, ev = write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    cfg = load_config(tiny_config(tiny_llama, tr, tmp_path / "run", "prompt-only", max_length=512))
    cfg.data.eval = str(ev)
    tok = load_tokenizer(tiny_llama)
    _, near = prepare_splits(cfg.data, tok, 512, 0, shots=Shots(2, "bm25", "Answer with one word."))
    for (prompt, _), t in zip(near.prompts, topics, strict=True):
        shown = [r for r in train_rows if r["prompt"] in prompt]
        assert len(shown) == 2 and all(t in r["prompt"] for r in shown), prompt  # its own topic's rows
        assert "Answer with one word." in prompt
    _, drawn = prepare_splits(cfg.data, tok, 512, 0, shots=Shots(2, "random"))
    firsts = {p.split("a ")[0] for p, _ in drawn.prompts}
    assert len(firsts) == 1  # random: one draw, the same examples before every prompt
