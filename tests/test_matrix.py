"""The behavioural matrix (PEFT's TEST_CASES idea): every strategy and hybrid x Llama- and GPT-2-shaped tiny
models, each checked for the same properties in one training run:

- the eval loss on a memorisable set goes down;
- only the parameters the strategy claims (the optimizer's) change; every other tensor is bit-identical;
- the trainable count in summary.json equals the count that actually received gradients;
- save -> load into a fresh base model gives identical logits;
- with every added module disabled, the model gives the base model's outputs (where that applies).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from conftest import tiny_config
from tunelab.models import load_model
from tunelab.run import load_run, train

LAYERWISE = {"name": "layerwise", "top": 1, "head": True}
LORA = {"name": "lora", "r": 8}
CASES = {
    # id: (strategy spec, learning rate, whether disabling gives the base model back)
    "full": ("full", 1e-2, False),
    "lora": ({"name": "lora", "r": 8}, 2e-2, True),
    "ia3": ({"name": "ia3"}, 1e-1, True),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4}, 2e-1, True),
    "prefix-projection": (
        {"name": "prefix", "num_virtual_tokens": 4, "projection": True, "encoder_hidden_size": 16},
        1e-2,
        True,
    ),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4}, 1e-1, True),
    "prompt-text-init": (
        {"name": "prompt", "num_virtual_tokens": 4, "init": "text", "init_text": "classify the text"},
        1e-1,
        True,
    ),
    "ptuning": ({"name": "ptuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}, 1e-2, True),
    "adapters-houlsby": ({"name": "adapters", "placement": "houlsby", "bottleneck": 8}, 1e-2, True),
    "adapters-pfeiffer": ({"name": "adapters", "placement": "pfeiffer", "bottleneck": 8}, 1e-2, True),
    "adapters-parallel": ({"name": "adapters", "placement": "parallel", "bottleneck": 8}, 1e-2, True),
    "layerwise-top": (LAYERWISE, 1e-2, False),
    "layerwise-decay-unfreeze": (
        {"name": "layerwise", "top": 2, "lr_decay": 0.5, "unfreeze_every_steps": 5, "embeddings": True},
        1e-2,
        False,
    ),
    "layerwise-select-auto": ({"name": "layerwise", "select": "auto", "budget": 1, "head": True}, 1e-2, False),
    "layerwise-lisa": ({"name": "layerwise", "sample": 1, "every": 2}, 1e-2, False),
    "hybrid-layerwise+prefix": ([LAYERWISE, {"name": "prefix", "num_virtual_tokens": 4}], 1e-2, False),
    "hybrid-prefix+lora": ([{"name": "prefix", "num_virtual_tokens": 4}, {"name": "lora", "r": 8}], 2e-2, True),
    "hybrid-adapters+lora": ([{"name": "adapters", "bottleneck": 8}, {"name": "lora", "r": 8}], 1e-2, True),
    "hybrid-layerwise+adapters": ([LAYERWISE, {"name": "adapters", "bottleneck": 8}], 1e-2, False),
    # any other PEFT method through the pass-through (here LoRA's own, which both model shapes support)
    "peft-pass-through": ({"name": "peft", "type": "lora", "r": 8, "target_modules": "all-linear"}, 2e-2, True),
    # regularizers train nothing themselves: each on top of LoRA, with the same checks
    "lora+l2": ([LORA, {"name": "l2", "weight": 0.1}], 2e-2, True),
    "lora+l2sp": ([LORA, {"name": "l2sp", "alpha": 0.1}], 2e-2, True),
    "lora+ewc": ([LORA, {"name": "ewc", "lam": 10.0, "samples": 8}], 2e-2, True),
    "lora+dropout": ([LORA, {"name": "dropout", "hidden": 0.1, "lora": 0.1}], 2e-2, True),
    "lora+retention": ([LORA, {"name": "retention", "lam": 0.1, "batch_size": 2}], 2e-2, True),
    "lora+replay": ([LORA, {"name": "replay", "share": 0.2}], 2e-2, True),
    # the teacher is the base model itself ("<base>" is replaced by the tiny model's path)
    "lora+distill": ([LORA, {"name": "distill", "teacher": "<base>", "alpha": 0.7}], 2e-2, True),
    # a student cut from its teacher (the run's model), aligned on hidden states, trained whole
    "full+distill-cut-student": (
        ["full", {"name": "student", "keep_layers": [1]}, {"name": "distill", "hidden_weight": 1.0}],
        1e-2,
        False,
    ),
    # adapters + distillation from a cached top-k teacher, a quarter of the batches on-policy
    "adapters+distill-topk-on-policy": (
        [
            {"name": "adapters", "bottleneck": 8},
            {"name": "distill", "top_k": 16, "on_policy": 0.25, "max_new_tokens": 4},
        ],
        1e-2,
        True,
    ),
    # layer-wise + distillation
    "layerwise+distill": ([LAYERWISE, {"name": "distill", "teacher": "<base>", "loss": "jsd"}], 1e-2, False),
}


def with_model(spec, model_dir):
    """The spec with "<base>" (a teacher) replaced by the model directory."""
    items = spec if isinstance(spec, list) else [spec]
    out = [
        {k: str(model_dir) if v == "<base>" else v for k, v in i.items()} if isinstance(i, dict) else i
        for i in items
    ]
    return out if isinstance(spec, list) else out[0]


class Probe(TrainerCallback):
    """Records the claimed parameters, their values before/after, and which ones received gradients."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.claimed = {self.names[id(p)] for g in optimizer.param_groups for p in g["params"]}
        self.with_grad: set[str] = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def load_as_the_card_says(model_dir, base_dir):
    """The model that the run's model card (model/README.md) says how to load, loaded by running the card's
    own snippet with PATH the model directory (and BASE, where the card asks for it, the base model's)."""
    import re

    card = (model_dir / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"PATH": str(model_dir)}
    exec(re.sub(r"^BASE = .*$", f"BASE = {str(base_dir)!r}", code, flags=re.M), scope)
    return scope["model"]


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_behaviour(case, tiny_model, memo_data, tmp_path):
    spec, lr, disable_gives_base = CASES[case]
    spec = with_model(spec, tiny_model)
    cfg = tiny_config(tiny_model, memo_data, tmp_path / "run", spec, max_steps=30, lr=lr, schedule="constant")
    cfg["eval"]["before"] = True
    probe = Probe()
    s = train(cfg, callbacks=[probe]).summary

    # the loss goes down
    assert s["eval"]["loss"] < 0.9 * s["eval_before"]["loss"], (s["eval_before"]["loss"], s["eval"]["loss"])

    # only claimed parameters change; everything else is bit-identical
    changed = {n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])}
    assert changed <= probe.claimed, sorted(changed - probe.claimed)[:5]
    assert changed == probe.claimed, sorted(probe.claimed - changed)[:5]

    # the trainable count reported is the count that received gradients
    params = dict(probe.model.named_parameters())
    assert s["parameters"]["trainable"] == sum(params[n].numel() for n in probe.with_grad)
    assert sum(s["parameters"]["components"].values()) == s["parameters"]["trainable"]

    # save -> load into a fresh base model -> identical logits
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    trained = logits(probe.model, ids)
    run = load_run(tmp_path / "run")
    loaded = run.model
    assert torch.equal(logits(loaded, ids), trained)

    # the model card's loading snippet loads this artefact (the library it names, or tunelab for parts)
    carded = load_as_the_card_says(tmp_path / "run" / "model", tiny_model)
    torch.testing.assert_close(logits(carded, ids), trained, rtol=1e-5, atol=1e-5)

    # disabling every added module gives the base model back (strategies that add modules only)
    base = logits(load_model(tiny_model), ids)
    with run.stack.disabled(loaded):
        disabled = logits(loaded, ids)
    assert torch.allclose(disabled, base, atol=1e-6) == disable_gives_base


def _is_regularizer(item) -> bool:
    from tunelab.strategies import registered
    from tunelab.strategies.base import Regularizer

    return issubclass(registered()[item if isinstance(item, str) else item["name"]], Regularizer)


REGULARIZED = [c for c, (spec, *_) in CASES.items() if isinstance(spec, list) and any(map(_is_regularizer, spec))]


@pytest.mark.parametrize("case", REGULARIZED)
def test_each_regularizer_changes_what_trains(case, tiny_llama, memo_data, tmp_path):
    """The checks above pass for a regularizer that does nothing (its run is then the plain strategy's): the
    same run without the regularizers (same seed, rate and steps) must end with different trained weights
    (on one architecture: the matrix above runs both)."""
    spec, lr, _ = CASES[case]
    spec = with_model(spec, tiny_llama)
    plain = [item for item in spec if not _is_regularizer(item)]
    after = {}
    for name, strategy in (("with", spec), ("without", plain)):
        cfg = tiny_config(
            tiny_llama, memo_data, tmp_path / name, strategy, max_steps=6, lr=lr, schedule="constant"
        )
        probe = Probe()
        train(cfg, callbacks=[probe])
        after[name] = {n: probe.after[n] for n in probe.claimed}
    common = after["with"].keys() & after["without"].keys()
    assert common, (sorted(after["with"])[:3], sorted(after["without"])[:3])
    assert any(not torch.equal(after["with"][n], after["without"][n]) for n in common), case


def test_the_plain_run_is_repeatable(tiny_llama, memo_data, tmp_path):
    """What makes the check above mean something: the same run twice gives the same weights, bit for bit."""
    after = []
    for name in ("a", "b"):
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / name, LORA, max_steps=6, lr=2e-2, schedule="constant")
        probe = Probe()
        train(cfg, callbacks=[probe])
        after.append({n: probe.after[n] for n in probe.claimed})
    assert after[0].keys() == after[1].keys() and all(torch.equal(after[0][n], after[1][n]) for n in after[0])


# Multi-task runs (mode: multitask, two tasks of different shapes): per-task parts over a shared body, with
# the same checks, each task's parts read back and routed.
MULTITASK_CASES = {
    "lora-per-task": ({"name": "lora", "r": 8, "per_task": True}, 2e-2),
    "prefix-per-task": ({"name": "prefix", "num_virtual_tokens": 4, "per_task": True}, 2e-1),
    "adapters-per-task": ({"name": "adapters", "bottleneck": 8, "per_task": True}, 1e-2),
    "lora+adapters-per-task": ([LORA, {"name": "adapters", "bottleneck": 8, "per_task": True}], 1e-2),
    "lora+heads": ([LORA, {"name": "heads"}], 2e-2),
}


@pytest.mark.parametrize("case", list(MULTITASK_CASES))
def test_multitask_behaviour(case, tiny_model, tmp_path):
    from conftest import MEMO_ROWS, write_jsonl

    spec, lr = MULTITASK_CASES[case]
    qa = write_jsonl(tmp_path / "qa.jsonl", MEMO_ROWS * 4)
    cls = write_jsonl(
        tmp_path / "cls.jsonl", [{"text": "good movie", "label": "pos"}, {"text": "bad book", "label": "neg"}] * 4
    )
    cfg = tiny_config(tiny_model, qa, tmp_path / "run", spec, max_steps=30, lr=lr, schedule="constant")
    cfg.update(mode="multitask", data=None, multitask={"sampling": "round_robin"})
    cfg["tasks"] = [
        {"name": "qa", "train": str(qa), "eval": str(qa)},
        {"name": "cls", "train": str(cls), "eval": str(cls)},
    ]
    cfg["eval"]["before"] = True
    probe = Probe()
    s = train(cfg, callbacks=[probe]).summary
    m = s["multitask"]
    for t in ("qa", "cls"):  # each task's loss goes down
        assert m["eval"][t]["loss"] < 0.9 * m["eval_before"][t]["loss"], (t, m["eval_before"][t], m["eval"][t])
    changed = {n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])}
    assert changed == probe.claimed, sorted(changed ^ probe.claimed)[:5]
    params = dict(probe.model.named_parameters())
    assert s["parameters"]["trainable"] == sum(params[n].numel() for n in probe.with_grad)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    run = load_run(tmp_path / "run")
    for t in ("qa", "cls"):  # each task's parts, read back, give the trained model's logits for that task
        run.stack.select_task(probe.model, t)
        run.stack.select_task(run.model, t)
        assert torch.equal(logits(run.model, ids), logits(probe.model, ids)), t
    carded = load_as_the_card_says(tmp_path / "run" / "model", tiny_model)  # its snippet routes to the first task
    run.stack.select_task(probe.model, "qa")
    torch.testing.assert_close(logits(carded, ids), logits(probe.model, ids), rtol=1e-5, atol=1e-5)
    if "heads" in case:
        assert m["eval"]["cls"]["head_accuracy"] == 1.0
        assert "head_accuracy" not in m["eval"]["qa"]
    base = logits(load_model(tiny_model), ids)
    with run.stack.disabled(run.model):
        assert torch.allclose(logits(run.model, ids), base, atol=1e-6)


# Baselines train nothing: the run scores the base model, which stays bit for bit the base model.
BASELINE_CASES = {
    "prompt-only-zero-shot": ({"name": "prompt-only"},),
    "prompt-only-2-shot": ({"name": "prompt-only", "shots": 2},),
}


@pytest.mark.parametrize("case", list(BASELINE_CASES))
def test_baseline_behaviour(case, tiny_model, memo_data, tmp_path):
    (spec,) = BASELINE_CASES[case]
    s = train(tiny_config(tiny_model, memo_data, tmp_path / "run", spec, max_length=256)).summary
    assert "train" not in s and s["parameters"]["trainable"] == 0
    assert "exact_match" in s["eval"] and s["eval"]["examples"] == 16
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    assert torch.equal(logits(load_run(tmp_path / "run").model, ids), logits(load_model(tiny_model), ids))


def test_every_registered_strategy_is_in_the_matrix():
    """A strategy registered without a matrix case would ship with none of the checks above."""
    from tunelab.strategies import registered

    covered = set()
    for spec, *_ in [*CASES.values(), *MULTITASK_CASES.values(), *BASELINE_CASES.values()]:
        for item in spec if isinstance(spec, list) else [spec]:
            covered.add(item if isinstance(item, str) else item["name"])
    assert sorted(set(registered()) - covered) == []
