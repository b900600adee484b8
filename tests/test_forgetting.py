"""Forgetting: penalties against closed forms, the Fisher against a hand computation, regularizers against
naive training on a tiny model that learned task A and then learns task B, and continual learning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import tiny_config, write_jsonl
from tunelab.config import load_config
from tunelab.fitter import fit
from tunelab.modes.continual import continual_metrics
from tunelab.run import train
from tunelab.session import Session
from tunelab.strategies.ewc import estimate_fisher, ewc_penalty
from tunelab.strategies.l2sp import l2sp_penalty

# ----------------------------------------------------------------------------- closed forms


def test_ewc_and_l2sp_penalties_equal_their_closed_forms():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    a = [torch.tensor([0.0, 1.0]), torch.tensor([[1.5]])]
    f = [torch.tensor([2.0, 3.0]), torch.tensor([[4.0]])]
    # λ/2 Σ F (θ-θ*)² = 10/2 * (2*1 + 3*1 + 4*1) = 45
    assert float(ewc_penalty(p, a, f, lam=10.0)) == pytest.approx(45.0)
    # α/2 Σ (θ-θ0)² = 0.1/2 * (1 + 1 + 1) = 0.15
    assert float(l2sp_penalty(p, a, alpha=0.1)) == pytest.approx(0.15)


class ToyLM(torch.nn.Module):
    """Embedding -> linear head: log p(y | x_t) has a closed-form gradient in the head weight."""

    def __init__(self, vocab=5, dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_fisher_matches_a_hand_computation():
    model = ToyLM()
    feats = [
        {"input_ids": [0, 1, 2], "labels": [-100, 1, 2], "length": 3},
        {"input_ids": [3, 4], "labels": [-100, 0], "length": 2},
    ]
    fisher = estimate_fisher(model, [model.head.weight], feats, pad_id=0, mode="empirical")[0]
    expected = torch.zeros_like(model.head.weight)
    with torch.no_grad():
        for f in feats:
            g = torch.zeros_like(model.head.weight)
            for t in range(len(f["input_ids"]) - 1):  # position t predicts token t+1
                y = f["labels"][t + 1]
                if y == -100:
                    continue
                h = model.emb.weight[f["input_ids"][t]]
                p = torch.softmax(model.head.weight @ h, -1)
                g += torch.outer(torch.nn.functional.one_hot(torch.tensor(y), 5).float() - p, h)
            expected += g**2
    torch.testing.assert_close(fisher, expected / len(feats))


def test_sampled_fisher_draws_targets_from_the_model():
    model = ToyLM()
    with torch.no_grad():  # make the model certain of token 2 everywhere: samples are then always 2
        model.head.weight.zero_()
        model.head.weight[2] = 50.0
        model.emb.weight.fill_(1.0)
    feats = [{"input_ids": [0, 1, 3], "labels": [-100, 4, 4], "length": 3}]
    sampled = estimate_fisher(model, [model.head.weight], feats, 0, "sampled")[0]
    empirical = estimate_fisher(model, [model.head.weight], feats, 0, "empirical")[0]
    assert float(sampled.abs().max()) < 1e-6  # certain and right: no information
    assert float(empirical.abs().max()) > 1.0  # the reference tokens (4) disagree with the model


def test_continual_metrics_follow_the_definitions():
    m = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.3, 0.5, 0.7]]
    out = continual_metrics(m)
    assert out["average_accuracy"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert out["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.5 - 0.8)) / 2)
    assert out["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)
    assert out["forgetting_max"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)


# ----------------------------------------------------------------------------- task A, then task B

A_ROWS = [
    {"prompt": "what is the colour of the sky ?", "completion": "blue"},
    {"prompt": "what is the colour of grass ?", "completion": "green"},
    {"prompt": "classify : good movie", "completion": "positive"},
    {"prompt": "classify : bad book", "completion": "negative"},
]
B_ROWS = [
    {"prompt": "one two three", "completion": "four five"},
    {"prompt": "hello world", "completion": "yes no"},
    {"prompt": "the cat sat on", "completion": "the mat"},
    {"prompt": "the dog sat on", "completion": "a red mat"},
]


@pytest.fixture(scope="module")
def after_a(tiny_llama, tmp_path_factory):
    """A tiny model that has learned task A (full fine-tuning), used as the base for learning B."""
    d = tmp_path_factory.mktemp("task-a")
    a = write_jsonl(d / "a.jsonl", A_ROWS * 4)
    cfg = tiny_config(tiny_llama, a, d / "run", "full", max_steps=40, lr=1e-2, schedule="constant")
    cfg["forgetting"] = {"enabled": False}
    train(cfg)
    write_jsonl(d / "a-prompts.jsonl", [{"prompt": r["prompt"]} for r in A_ROWS])
    b = write_jsonl(d / "b.jsonl", B_ROWS * 4)
    return d / "run" / "model", a, d / "a-prompts.jsonl", b


def learn_b(after_a, tmp_path, extra):
    """Full fine-tuning on B from the A-trained model (+ regularizers); A's eval loss rise and the retention
    metrics on A's prompts. The Fisher of a model that fits A is tiny, hence EWC's large λ below."""
    model_dir, a, a_prompts, b = after_a
    cfg = tiny_config(model_dir, b, tmp_path / "run", ["full", *extra], max_steps=25, lr=1e-2, schedule="constant")
    cfg["forgetting"] = {"builtin": False, "file": str(a_prompts), "max_new_tokens": 4, "original_tasks": [str(a)]}
    s = train(cfg).summary
    task_a = s["forgetting"]["original_tasks"][str(a)]
    return task_a["delta"]["loss"], s["forgetting"], s


@pytest.fixture(scope="module")
def naive(after_a, tmp_path_factory):
    return learn_b(after_a, tmp_path_factory.mktemp("naive"), [])


@pytest.mark.parametrize(
    "regularizer",
    [
        {"name": "ewc", "lam": 1e7, "data": "A"},
        {"name": "replay", "share": 0.5},
        {"name": "retention", "lam": 5.0},
        {"name": "l2sp", "alpha": 1.0},
    ],
    ids=["ewc", "replay", "retention", "l2sp"],
)
def test_regularizers_forget_task_a_less_than_naive_training(regularizer, after_a, naive, tmp_path):
    if regularizer.get("data") == "A":
        regularizer = {**regularizer, "data": str(after_a[1])}
    naive_rise, naive_forgetting, naive_summary = naive
    rise, forgetting, s = learn_b(after_a, tmp_path, [regularizer])
    assert naive_rise > 0.5  # naive training on B really forgets A
    assert rise < 0.7 * naive_rise, (rise, naive_rise)
    # the retention metrics (on A's prompts, with the A-trained model's answers) move the same way
    assert naive_forgetting["after"]["kl"] > 0
    assert forgetting["after"]["kl"] < naive_forgetting["after"]["kl"]
    assert forgetting["after"]["base_answer_ppl"] < naive_forgetting["after"]["base_answer_ppl"]
    assert forgetting["before"]["kl"] == 0 and forgetting["before"]["exact_reproduction"] == 1.0


def test_summary_reports_forgetting_with_deltas(naive):
    _, forgetting, _ = naive
    assert set(forgetting) >= {"before", "after", "delta", "original_tasks"}
    assert forgetting["delta"]["kl"] == forgetting["after"]["kl"]
    assert forgetting["delta"]["base_answer_ppl"] > 0 and forgetting["delta"]["exact_reproduction"] <= 0


def test_the_frozen_reference_never_receives_gradients(after_a, tmp_path):
    model_dir, a, a_prompts, b = after_a
    cfg = load_config(
        tiny_config(model_dir, b, tmp_path / "run", ["full", {"name": "retention", "lam": 1.0}], max_steps=3)
        | {"forgetting": {"builtin": False, "file": str(a_prompts)}}
    )
    session = Session(cfg, main=True, run_dir=tmp_path / "run")
    session.load()
    (tmp_path / "run").mkdir()
    from tunelab.data import prepare_file

    train_rows = prepare_file(b, session.tokenizer, cfg.data, 64).features
    fit(session, train_rows, None, tmp_path / "run")
    copy = session.ctx.reference._copy
    assert copy is not None  # full fine-tuning changes base weights: a frozen copy was needed
    assert all(not p.requires_grad and p.grad is None for p in copy.parameters())
    from tunelab.models import load_model

    fresh = load_model(model_dir)
    assert all(torch.equal(p, q) for p, q in zip(copy.parameters(), fresh.parameters(), strict=True))


def test_adapter_strategies_need_no_second_model(tiny_llama, memo_data, tmp_path):
    cfg = load_config(tiny_config(tiny_llama, memo_data, tmp_path / "run", ["lora", "retention"], max_steps=2))
    session = Session(cfg, main=True, run_dir=tmp_path / "run")
    session.load()
    (tmp_path / "run").mkdir()
    fit(session, session.ctx.load_rows(str(memo_data)), None, tmp_path / "run")
    assert session.ctx.reference._copy is None  # base outputs came from the model with LoRA disabled


# ----------------------------------------------------------------------------- continual learning


def continual_config(tiny_llama, tmp_path, strategy, **continual):
    a = write_jsonl(tmp_path / "a.jsonl", A_ROWS * 4)
    b = write_jsonl(tmp_path / "b.jsonl", B_ROWS * 4)
    cfg = tiny_config(tiny_llama, a, tmp_path / "run", strategy, max_steps=30, lr=2e-2, schedule="constant")
    del cfg["data"]
    cfg["tasks"] = [{"name": "A", "train": str(a), "eval": str(a)}, {"name": "B", "train": str(b), "eval": str(b)}]
    cfg["continual"] = continual
    cfg["forgetting"] = {"max_new_tokens": 4}
    return cfg


def test_continual_run_writes_matrix_metrics_and_heatmap(tiny_llama, tmp_path):
    s = train(continual_config(tiny_llama, tmp_path, "lora")).summary
    c = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert c["tasks"] == ["A", "B"] and len(c["matrix"]) == 2 and len(c["before"]) == 2
    assert set(c) >= {"average_accuracy", "backward_transfer", "forgetting", "forgetting_max", "metric"}
    assert c["metric"] == "exact_match"
    assert (tmp_path / "run" / "continual.png").stat().st_size > 1000
    assert s["continual"]["average_accuracy"] == c["average_accuracy"]
    assert (tmp_path / "run" / "tasks" / "0-A" / "metrics.jsonl").is_file()
    assert "forgetting" in s
    from tunelab.run import evaluate

    metrics = evaluate(tmp_path / "run", tmp_path / "b.jsonl")  # the final model, on any file
    assert metrics["exact_match"] == pytest.approx(c["matrix"][-1][1])


def test_per_task_adapters_with_routing_cannot_forget(tiny_llama, tmp_path):
    s = train(continual_config(tiny_llama, tmp_path, "lora", per_task_adapter=True)).summary
    m = s["continual"]["matrix"]
    assert m[1][0] == m[0][0]  # task A still scored with A's own adapter
    assert s["continual"]["forgetting"] == 0
    # one per-task mechanism: LoRA's own copy per task (per_task, set from continual.per_task_adapter), saved
    # as a multi-task run's per-task parts are
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"][0]["per_task"] is True
    assert (tmp_path / "run" / "model" / "A" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "model" / "B" / "adapter_config.json").is_file()
    from peft import PeftModel

    from tunelab.models import load_model
    from tunelab.run import RunError, evaluate, load_artefact

    with pytest.raises(RunError, match="has parts per task; choose one with --task"):
        evaluate(tmp_path / "run")
    # each task read back on its own copy scores what the run recorded for it after the sequence
    assert evaluate(tmp_path / "run", task="A")["exact_match"] == pytest.approx(m[1][0])
    # the artefact alone: each task's adapter back on the base, as PEFT itself loads it
    model_dir, ids = tmp_path / "run" / "model", torch.tensor([[1, 50, 60, 70, 2]])
    with torch.no_grad():
        for task in ("A", "B"):
            ours = load_artefact(model_dir, base=tiny_llama, task=task).model
            peft = PeftModel.from_pretrained(load_model(tiny_llama), model_dir / task).eval()
            assert torch.equal(ours(input_ids=ids).logits, peft(input_ids=ids).logits), task
    with pytest.raises(RunError, match="give task= one of A, B"):
        load_artefact(model_dir, base=tiny_llama)
    card = (model_dir / "README.md").read_text()
    assert "tunelab.load_artefact(PATH, base=BASE, task='A')" in card and "library_name" not in card


def test_continual_config_checks():
    from tunelab.config import ConfigError

    with pytest.raises(ConfigError, match="at least two tasks"):
        load_config({"tasks": [{"name": "a", "train": "x", "eval": "y"}]})
    with pytest.raises(ConfigError, match="needs eval data"):
        load_config({"tasks": [{"name": "a", "train": "x"}, {"name": "b", "train": "y", "eval": "z"}]})
    with pytest.raises(ConfigError, match="either data"):
        load_config({"data": {"train": "x"}, "tasks": [{"name": "a", "train": "x", "eval": "y"}] * 2})
    tasks = [{"name": n, "train": "x", "eval": "y"} for n in "ab"]
    # one copy per task is the strategies' per_task: refused, before loading, for one that changes base weights
    with pytest.raises(ConfigError, match=r"continual.per_task_adapter needs strategies .*; full cannot"):
        load_config({"tasks": tasks, "strategy": "full", "continual": {"per_task_adapter": True}})
    with pytest.raises(ConfigError, match="continual takes from continual.per_task_adapter"):
        load_config({"tasks": tasks, "strategy": {"name": "lora", "per_task": True}})
    routed = load_config({"tasks": tasks, "strategy": ["lora", "ewc"], "continual": {"per_task_adapter": True}})
    assert [getattr(c, "per_task", None) for c in routed.strategy] == [True, None]  # the regularizer keeps none
    assert type(load_config(routed.to_dict())) is type(routed)  # the resolved config reads back


# ----------------------------------------------------------------------------- dropout and decoupled L2


def test_dropout_control_sets_attention_hidden_and_lora_rates(tiny_model):
    from tunelab.models import load_model
    from tunelab.strategies.stack import StrategyStack

    cfg = load_config(
        {
            "data": {"train": "x"},
            "strategy": [
                {"name": "lora", "dropout": 0.0},
                {"name": "dropout", "attention": 0.3, "hidden": 0.5, "lora": 0.2},
            ],
        }
    )
    model = StrategyStack(cfg.strategy).apply(load_model(tiny_model))
    attn = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    assert all(getattr(m, "attention_dropout", None) == 0.3 or m.attn_dropout.p == 0.3 for m in attn)
    lora_p = {d.p for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()}
    assert lora_p == {0.2}
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # no dropout in eval
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # hidden dropout on


def test_decoupled_l2_shrinks_each_trained_parameter_by_lr_times_weight():
    from tunelab.strategies.l2 import _Decay

    p, q = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    p.grad = torch.zeros(2)  # q has no gradient (frozen this step): untouched
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.5}])
    _Decay(weight=0.2).on_pre_optimizer_step(None, None, None, optimizer=opt)
    torch.testing.assert_close(p.detach(), torch.tensor([0.98, -1.96]))
    assert q.item() == 3.0


def test_online_ewc_accumulates_the_fisher_at_each_task_end(tiny_llama, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    cfg = continual_config(
        tiny_llama,
        tmp_path,
        ["full", {"name": "ewc", "lam": 10.0, "gamma": 0.5, "samples": 4}, {"name": "replay", "share": 0.25}],
    )
    s = train(cfg, callbacks=[Watch()]).summary
    assert len(seen) == 2  # one Trainer run per task
    assert s["train"][1]["rows"] > 16  # task B's 16 rows + replayed rows of task A and the retention set
    losses = [
        json.loads(x) for x in (tmp_path / "run" / "tasks" / "1-B" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(r.get("loss_terms/ewc/penalty", 0) > 0 for r in losses)  # the anchor from task A pulls in task B
