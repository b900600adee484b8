"""The strategy contract as the engine applies it (issue 8): extra loss terms count in training only,
learning rates are resolved once per component from its own options and defaults."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from tunelab.run import evaluate, train


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_loss_is_the_task_loss_alone_and_terms_are_logged_apart(tiny_llama, memo_data, tmp_path):
    strategy = [{"name": "lora", "r": 8}, {"name": "l2sp", "alpha": 100.0}]
    cfg = tiny_config(
        tiny_llama, memo_data, tmp_path / "run", strategy, max_steps=6, eval_steps=6, lr=5e-2, logging_steps=1
    )
    cfg["eval"]["batch_size"] = 16  # one eval batch: the Trainer's eval_loss is then the token mean too
    run = train(cfg).run_dir
    logs = records(run)
    eval_loss = [r["eval_loss"] for r in logs if "eval_loss" in r][-1]
    assert eval_loss == pytest.approx(evaluate(run)["loss"], abs=1e-4)  # eval_loss is the task's alone ...
    last = [r for r in logs if "loss" in r][-1]
    penalty = last["loss_terms/l2sp/penalty"]
    assert penalty > 0.01  # ... while the term is real, logged under its own name, and trained on
    assert last["loss"] == pytest.approx(last["loss_terms/task"] + penalty, rel=1e-5)


def test_a_hybrid_trains_each_component_at_its_own_default_rate(tiny_llama, memo_data, tmp_path):
    from tunelab.strategies import get_strategy

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", ["prefix", "lora"], max_steps=2)
    cfg["training"].pop("lr")
    s = train(cfg).summary
    want = {"lora": get_strategy("lora").default_lr, "prefix": get_strategy("prefix").default_lr}
    assert want["lora"] != want["prefix"]
    assert s["train"]["learning_rate"] == want
    first = [r for r in records(tmp_path / "run") if "loss" in r][0]
    lrs = {k.removeprefix("lr/"): v for k, v in first.items() if k.startswith("lr/")}
    assert set(lrs) == {"lora", "prefix"}  # every group's rate is logged (constant warmup-free linear decay)
    assert lrs["prefix"] / lrs["lora"] == pytest.approx(want["prefix"] / want["lora"])


def test_training_lr_and_a_components_own_lr(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(
        tiny_llama, memo_data, tmp_path / "run", ["prefix", {"name": "lora", "lr": 3e-3}], max_steps=2
    )
    cfg["training"]["lr"] = 1e-2
    assert train(cfg).summary["train"]["learning_rate"] == {"lora": 3e-3, "prefix": 1e-2}


def test_an_option_that_does_nothing_in_the_stack_is_refused():
    from tunelab.config import ConfigError, load_config

    base = {"data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match="dropout.lora: no strategy in this stack adds LoRA layers"):
        load_config({**base, "strategy": ["full", {"name": "dropout", "lora": 0.1}]})
    for with_lora in ("lora", {"name": "peft", "type": "lora", "r": 4}):
        load_config({**base, "strategy": [with_lora, {"name": "dropout", "lora": 0.1}]})
    load_config({**base, "strategy": ["full", {"name": "dropout", "hidden": 0.1}]})  # hidden acts on any model


def test_phases_order_a_hybrid_whatever_the_list_order():
    from tunelab.config import load_config
    from tunelab.strategies import Phase, build_strategies, get_strategy

    cfg = load_config(
        {"data": {"train": "t"}, "strategy": ["ewc", {"name": "adapters"}, "prefix", {"name": "lora"}]}
    )
    ordered = build_strategies(cfg.strategy)
    assert [s.name for s in ordered] == ["lora", "prefix", "adapters", "ewc"]
    assert [s.phase_of(s.config) for s in ordered] == [Phase.TUNER, Phase.PROMPT, Phase.NATIVE, Phase.REGULARIZER]
    peft = get_strategy("peft")
    as_prompt = load_config({"data": {"train": "t"}, "strategy": {"name": "peft", "type": "prefix_tuning"}})
    assert peft.phase_of(as_prompt.strategy[0]) is Phase.PROMPT
