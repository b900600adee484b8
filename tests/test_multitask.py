"""mode: multitask — sampling, routing of batches to per-task parts, per-task logs and scores, read-back."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import TrainerCallback

from conftest import MEMO_ROWS, write_jsonl
from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.data import Collator
from tunelab.modes.multitask import TaskMixSampler, task_probabilities
from tunelab.run import evaluate, generate, load_run, train

CLS_ROWS = [{"text": "good movie", "label": "positive"}, {"text": "bad book", "label": "negative"}]


@pytest.fixture
def two_tasks(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", MEMO_ROWS * 4)  # 16 rows, prompt/completion
    cls = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS * 4)  # 8 rows, classification
    return [
        {"name": "qa", "train": str(qa), "eval": str(qa)},
        {"name": "cls", "train": str(cls), "eval": str(cls)},
    ]


def mt_config(model, tasks, out, strategy, **training):
    t = {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "logging_steps": 2, "save_steps": 100}
    t.update(precision="fp32", max_length=64, schedule="constant", **training)
    return {
        "model": str(model),
        "mode": "multitask",
        "tasks": tasks,
        "strategy": strategy,
        "training": t,
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "output_dir": str(out),
    }


# -- sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["proportional", "uniform", "temperature"])
def test_batch_tasks_follow_the_configured_distribution(sampling):
    sizes = [600, 200, 50]
    p = task_probabilities(sizes, sampling, temperature=3.0)
    expected = {
        "proportional": [600 / 850, 200 / 850, 50 / 850],
        "uniform": [1 / 3] * 3,
        "temperature": [n ** (1 / 3) / sum(m ** (1 / 3) for m in sizes) for m in [0] for n in sizes],
    }[sampling]
    assert p == pytest.approx(expected)
    tags = [t for t, n in enumerate(sizes) for _ in range(n)]
    counts: Counter = Counter()
    sampler = TaskMixSampler(tags, 5, p, seed=0)
    for epoch in range(40):  # 40 epochs x 170 batches = 6,800 draws
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i : i + 5] for i in range(0, len(order), 5)]
        for b in batches:
            assert len({tags[i] for i in b}) == 1  # every batch holds rows of one task
            counts[tags[b[0]]] += 1
    total = sum(counts.values())
    for t, q in enumerate(expected):
        sd = (q * (1 - q) / total) ** 0.5
        assert abs(counts[t] / total - q) < 4 * sd + 1e-9, (sampling, t, counts[t] / total, q)


def test_round_robin_takes_tasks_in_turn_and_rows_in_passes():
    tags = [0] * 9 + [1] * 3 + [2] * 6
    sampler = TaskMixSampler(tags, 3, None, seed=1)
    order = list(sampler)
    assert len(order) == len(tags)
    batch_tasks = [tags[order[i]] for i in range(0, len(order), 3)]
    assert batch_tasks == [0, 1, 2, 0, 1, 2]
    # task 1 has one batch of rows: a second visit starts a new pass over the same three rows
    task1 = [order[i] for i in range(len(order)) if tags[order[i]] == 1]
    assert sorted(task1[:3]) == sorted(task1[3:]) == [9, 10, 11]


def test_order_depends_only_on_seed_and_epoch():
    tags = [0] * 20 + [1] * 7
    a, b = TaskMixSampler(tags, 4, [0.5, 0.5], seed=3), TaskMixSampler(tags, 4, [0.5, 0.5], seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter (a resume restores another state)
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first


def test_task_of_each_row_reaches_the_batch():
    rows = [{"input_ids": [5, 6], "labels": [5, 6], "length": 2, "task": 1}] * 2
    assert Collator(0, annotations=True)(rows)["task"].tolist() == [1, 1]
    assert "task" not in Collator(0)(rows)  # batches for the model's own forward carry tokens only


# -- validation -----------------------------------------------------------------------------------
def test_per_task_parts_and_weights_need_multitask_mode(two_tasks, tiny_llama, tmp_path, memo_data):
    single = {"model": str(tiny_llama), "data": {"train": str(memo_data)}, "output_dir": str(tmp_path / "r")}
    with pytest.raises(ConfigError, match="per_task gives one copy per task of a multi-task run"):
        load_config({**single, "strategy": {"name": "lora", "per_task": True}})
    weighted = [{**two_tasks[0], "weight": 2.0}, two_tasks[1]]
    with pytest.raises(ConfigError, match="only mode: multitask uses"):
        load_config({**single, "data": None, "tasks": weighted})  # tasks alone means continual
    with pytest.raises(ConfigError, match="tasks.0.name"):
        load_config(
            {**single, "data": None, "mode": "multitask", "tasks": [{**two_tasks[0], "name": "a.b"}, two_tasks[1]]}
        )
    with pytest.raises(ConfigError, match="multitask.sampling"):
        load_config(
            {**single, "data": None, "mode": "multitask", "tasks": two_tasks, "multitask": {"sampling": "x"}}
        )


# -- training: routing, isolation, logs, artefacts -----------------------------------------------
class Routing(TrainerCallback):
    """Per optimizer step: the adapter that was active and the per-task parameters that got a gradient."""

    def __init__(self, tasks):
        self.tasks, self.steps = tasks, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        active = {tuple(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)}
        got = {
            t
            for n, p in model.named_parameters()
            if p.grad is not None and bool(p.grad.abs().sum() > 0)
            for t in self.tasks
            if f".{t}." in n
        }
        shared = any(
            p.grad is not None and not any(f".{t}." in n for t in self.tasks) for n, p in model.named_parameters()
        )
        self.steps.append((active, got, shared))


def test_per_task_adapters_get_gradients_only_from_their_tasks_rows(two_tasks, tiny_llama, tmp_path):
    """Per-task LoRA (PEFT adapters named after the tasks) + per-task bottleneck adapters: at every step the
    only per-task parameters with a gradient are those of the batch's task, in the sampler's order."""
    spec = [{"name": "lora", "r": 4, "per_task": True}, {"name": "adapters", "bottleneck": 4, "per_task": True}]
    cfg = mt_config(tiny_llama, two_tasks, tmp_path / "run", spec, max_steps=10)
    cfg["multitask"] = {"sampling": "uniform"}
    probe = Routing(["qa", "cls"])
    s = train(cfg, callbacks=[probe]).summary
    sampler = TaskMixSampler([0] * 16 + [1] * 8, 4, task_probabilities([16, 8], "uniform", 1), seed=42)
    expected = [["qa", "cls"][t] for t in sampler.task_order(torch.Generator().manual_seed(42))][:6]
    expected += [["qa", "cls"][t] for t in sampler.task_order(torch.Generator().manual_seed(43))][:4]
    assert [next(iter(a))[0] for a, _, _ in probe.steps] == expected
    for active, got, _ in probe.steps:
        assert got == {next(iter(active))[0]}
    assert set(expected) == {"qa", "cls"}
    assert s["multitask"]["per_task_parts"] is True
    # one PEFT adapter directory per task, each loadable on its own by PEFT
    from peft import PeftModel

    from tunelab.models import load_model

    lora_dir = tmp_path / "run" / "model" / "lora"
    assert json.loads((lora_dir / "tasks.json").read_text()) == ["qa", "cls"]
    for t in ("qa", "cls"):
        m = PeftModel.from_pretrained(load_model(tiny_llama), lora_dir / t)
        assert m.active_adapter == "default"


def test_shared_lora_and_per_task_adapters_read_back_per_task(two_tasks, tiny_llama, tmp_path, capsys):
    spec = [{"name": "lora", "r": 4}, {"name": "adapters", "bottleneck": 4, "per_task": True}]
    cfg = mt_config(tiny_llama, [{**two_tasks[0], "weight": 2.0}, two_tasks[1]], tmp_path / "run", spec)
    cfg["training"]["eval_steps"] = 6
    cfg["eval"]["before"] = True
    probe = Routing(["qa", "cls"])
    s = train(cfg, callbacks=[probe]).summary
    assert all(shared for _, _, shared in probe.steps)  # the shared LoRA learns from every task

    m = s["multitask"]
    assert m["weights"] == {"qa": 2.0, "cls": 1.0}
    assert m["probabilities"] == pytest.approx({"qa": 16 / 24, "cls": 8 / 24})
    assert set(m["eval"]) == {"qa", "cls"}
    assert "exact_match" in m["eval"]["qa"] and "accuracy" in m["eval"]["cls"]
    assert m["eval"]["qa"]["loss"] < m["eval_before"]["qa"]["loss"]
    assert m["eval"]["cls"]["loss"] < m["eval_before"]["cls"]["loss"]

    # per-task training losses, eval losses and final scores in metrics.jsonl; scores in TensorBoard
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {"loss/qa", "loss/cls", "eval_qa_loss", "eval_cls_loss"} <= keys
    finals = {x["task"]: x for x in lines if x.get("event") == "task_eval"}
    assert finals["cls"]["accuracy"] == m["eval"]["cls"]["accuracy"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for d in {p.parent for p in (tmp_path / "run" / "tb").rglob("events.*")}:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/qa/exact_match", "eval/cls/accuracy"} <= tags
    assert any(t.endswith("loss/qa") for t in tags)

    # read back: each task's parts answer for it; scores equal the run's own
    for t in ("qa", "cls"):
        again = evaluate(tmp_path / "run", task=t)
        assert again["loss"] == pytest.approx(m["eval"][t]["loss"], rel=1e-5)
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    run = load_run(tmp_path / "run")
    outs = {}
    for t in ("qa", "cls"):
        run.stack.select_task(run.model, t)
        with torch.no_grad():
            outs[t] = run.model(input_ids=ids).logits
    assert not torch.equal(outs["qa"], outs["cls"])
    assert generate(tmp_path / "run", "what is the colour of grass ?", task="qa", max_new_tokens=3)
    # without --task, a run with parts per task refuses (exit 2, one line naming the tasks)
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "choose one with --task (qa, cls)" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "hi", "--task", "nope"]) == 2
    assert "no such task; its tasks: qa, cls" in capsys.readouterr().err
    # per-task parts cannot be merged into one model
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 2


def test_task_weight_scales_that_tasks_loss(two_tasks, tiny_llama, tmp_path):
    """Same data and order; a weight of 3 on one task makes that task's gradient 3x (AdamW normalizes steps,
    so compare the first step's gradient norm with clipping off)."""

    class FirstGrad(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.norm = float(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
                )

    norms = []
    for w in (1.0, 3.0):
        tasks = [{**two_tasks[0], "weight": w}, {**two_tasks[1], "weight": w}]
        cfg = mt_config(tiny_llama, tasks, tmp_path / f"run{w}", {"name": "lora", "r": 4}, max_steps=1)
        cfg["training"]["max_grad_norm"] = 0
        cfg["forgetting"] = {"enabled": False}
        probe = FirstGrad()
        train(cfg, callbacks=[probe])
        norms.append(probe.norm)
    assert norms[1] == pytest.approx(3 * norms[0], rel=1e-4)


@pytest.mark.parametrize(
    "regularizer",
    [
        {"name": "ewc", "lam": 10.0, "samples": 8},
        {"name": "l2sp", "alpha": 0.1},
        {"name": "retention", "lam": 0.1, "batch_size": 2},
        {"name": "replay", "share": 0.25},
    ],
    ids=lambda r: r["name"],
)
def test_multitask_with_regularizers(regularizer, two_tasks, tiny_llama, tmp_path):
    """multitask + EWC / L2-SP / retention / replay in one config: the regularizer acts (its term is logged,
    or its rows reach each task) and every task is scored."""
    cfg = mt_config(tiny_llama, two_tasks, tmp_path / "run", [{"name": "lora", "r": 4}, regularizer])
    s = train(cfg).summary
    assert set(s["multitask"]["eval"]) == {"qa", "cls"}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if regularizer["name"] == "replay":
        # a quarter of each task's final rows are replayed: 16 + round(16 / 3), 8 + round(8 / 3)
        assert s["multitask"]["train_rows"] == {"qa": 21, "cls": 11}
    else:
        assert any(k.startswith(f"loss_terms/{regularizer['name']}/") for x in lines for k in x)
    assert "forgetting" in s


def test_resume_after_a_kill_gives_identical_weights(two_tasks, tiny_llama, tmp_path):
    from conftest import crash_at, final_weights

    spec = [{"name": "lora", "r": 4}, {"name": "adapters", "bottleneck": 4, "per_task": True}]
    whole = mt_config(tiny_llama, two_tasks, tmp_path / "whole", spec, max_steps=10, save_steps=3)
    whole["multitask"] = {"sampling": "temperature", "temperature": 2.0}
    whole["forgetting"] = {"enabled": False}
    train(whole)
    cut = {**whole, "output_dir": str(tmp_path / "cut")}
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=[crash_at(7)])
    train(cut, resume=True)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert len(a) > 4 and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# -- classification heads per task ----------------------------------------------------------------
def test_a_head_per_classification_task_learns_only_from_its_rows(two_tasks, tiny_llama, tmp_path):
    """Two classification tasks with their own label sets and a prompt/completion task: each
    classification task gets a head sized to its labels, each head a gradient only on its task's batches,
    the prompt/completion task none; after training each head classifies its task's eval rows."""
    yes_no = write_jsonl(
        tmp_path / "yn.jsonl",
        [
            {"text": "is the sky blue", "label": "yes"},
            {"text": "is grass red", "label": "no"},
            {"text": "is the sun hot", "label": "yes"},
        ]
        * 3,
    )
    tasks = [*two_tasks, {"name": "yn", "train": str(yes_no), "eval": str(yes_no)}]
    cfg = mt_config(
        tiny_llama, tasks, tmp_path / "run", [{"name": "lora", "r": 4}, {"name": "heads"}], max_steps=45, lr=5e-3
    )
    cfg["multitask"] = {"sampling": "round_robin"}

    class HeadGrads(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            got = {
                n.split("heads.heads.")[1].split(".")[0]
                for n, p in model.named_parameters()
                if "task_heads" in n and p.grad is not None and bool(p.grad.abs().sum() > 0)
            }
            self.steps.append(got)

    probe = HeadGrads()
    s = train(cfg, callbacks=[probe]).summary
    assert probe.steps[:6] == [set(), {"cls"}, {"yn"}, set(), {"cls"}, {"yn"}]  # round robin: qa, cls, yn
    m = s["multitask"]
    assert m["labels"] == {"qa": None, "cls": ["negative", "positive"], "yn": ["no", "yes"]}
    assert m["eval"]["cls"]["head_accuracy"] == 1.0 and m["eval"]["yn"]["head_accuracy"] == 1.0
    assert "head_accuracy" not in m["eval"]["qa"]
    meta = json.loads((tmp_path / "run" / "model" / "heads" / "heads.json").read_text())
    assert meta["labels"] == {"cls": ["negative", "positive"], "yn": ["no", "yes"]}
    assert evaluate(tmp_path / "run", task="yn")["head_accuracy"] == 1.0  # read back, routed to its head


def test_heads_need_classification_tasks_and_are_always_per_task(two_tasks, tiny_llama, tmp_path, capsys):
    qa_only = [two_tasks[0], {**two_tasks[0], "name": "qa2"}]
    cfg = mt_config(tiny_llama, qa_only, tmp_path / "run", [{"name": "lora", "r": 4}, {"name": "heads"}])
    assert main_train(cfg, tmp_path) == 2
    assert "heads: no task has classification rows" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()
    with pytest.raises(ConfigError, match="per_task cannot be false"):
        load_config({**cfg, "strategy": [{"name": "lora"}, {"name": "heads", "per_task": False}]})


def main_train(cfg: dict, tmp_path) -> int:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", str(path)])
