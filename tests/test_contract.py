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
    assert [s.declare(s.config).phase for s in ordered] == [
        Phase.TUNER,
        Phase.PROMPT,
        Phase.NATIVE,
        Phase.REGULARIZER,
    ]
    peft = get_strategy("peft")
    as_prompt = load_config({"data": {"train": "t"}, "strategy": {"name": "peft", "type": "prefix_tuning"}})
    assert peft.declare(as_prompt.strategy[0]).phase is Phase.PROMPT


def test_load_config_never_mutates_its_input():
    from tunelab.config import load_config

    raw = {"data": {"train": "t.jsonl"}, "training": {"lr": 1e-3}, "strategy": "lora"}
    snapshot = json.dumps(raw, sort_keys=True)
    cfg = load_config(raw, ["training.lr=0.5", "strategy.r=4", "data.eval=e.jsonl"])
    assert cfg.training.lr == 0.5 and cfg.strategy[0].r == 4
    assert json.dumps(raw, sort_keys=True) == snapshot


# ----------------------------------------------------------------------------- a new strategy, no edit elsewhere


@pytest.fixture
def shift_strategy():
    """A strategy defined here, outside tunelab: a trainable vector added to the final norm's output.
    It declares and implements only the contract; nothing in tunelab knows it."""
    from contextlib import contextmanager

    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.strategies import Strategy, StrategyConfig, register_strategy, unwrap
    from tunelab.strategies.base import _REGISTRY

    class Shift(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.zeros(width))  # zero: the model is unchanged at step 0
            self.enabled = True

        def hook(self, module, args, output):
            return output + self.shift if self.enabled else output

    def insert(model) -> Shift:
        norm = unwrap(model).model.norm
        shift = Shift(norm.weight.shape[0])
        norm.add_module("shift", shift)
        norm.register_forward_hook(shift.hook)
        return shift

    class ShiftStrategy(Strategy):
        name = "shift_test"
        summary = "A test strategy: a trainable shift after the final norm."
        Config = StrategyConfig
        default_lr = 1e-1

        def apply(self, model):
            self.module = insert(model)
            return model

        def own_parameters(self, model):
            return [("shift", self.module.shift)]

        @contextmanager
        def disabled(self, model):
            found = [m for m in model.modules() if isinstance(m, Shift)]
            for m in found:
                m.enabled = False
            try:
                yield
            finally:
                for m in found:
                    m.enabled = True

        def save(self, model, out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file({"shift": self.module.shift.detach().contiguous()}, out_dir / "shift.safetensors")

        @classmethod
        def load(cls, base_model, out_dir):
            with torch.no_grad():
                insert(base_model).shift.copy_(load_file(out_dir / "shift.safetensors")["shift"])
            return base_model

    register_strategy(ShiftStrategy)
    yield ShiftStrategy
    _REGISTRY.pop("shift_test")


def test_a_new_strategy_that_adds_modules_needs_no_edit_elsewhere(shift_strategy, tiny_llama, memo_data, tmp_path):
    import torch

    from tunelab.models import load_model
    from tunelab.run import load_run

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", ["shift_test"], max_steps=10, lr=1e-1)
    s = train(cfg).summary
    assert s["parameters"]["components"] == {"shift_test": 32}
    assert s["forgetting"]["after"]["kl"] > 0  # measured against the base: through its disabled()
    run = load_run(tmp_path / "run")
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        base = load_model(tiny_llama)(input_ids=ids).logits
        assert not torch.allclose(run.model(input_ids=ids).logits, base)
        with run.stack.disabled(run.model):
            assert torch.allclose(run.model(input_ids=ids).logits, base, atol=1e-6)


@pytest.mark.parametrize(
    ("training_lr", "want"),
    [
        # layer-wise's own lr wins over training.lr, which prefix takes; the top block at the base rate, the
        # block below at lr_decay times it
        (1e-2, {"layerwise/block1": 4e-4, "layerwise/block0": 2e-4, "prefix": 1e-2}),
        # no training.lr: prefix falls back to its default
        (None, {"layerwise/block1": 4e-4, "layerwise/block0": 2e-4, "prefix": "default"}),
    ],
)
def test_the_learning_rate_walks_from_yaml_to_the_optimizer_groups(
    tiny_llama, memo_data, tmp_path, training_lr, want
):
    """The rate is decided once (StrategyStack.rates): each optimizer group, Trainer's one rate and the
    summary's learning_rate read it, from the YAML file as written."""
    import yaml

    from tunelab import fitter
    from tunelab.config import load_config
    from tunelab.session import Session
    from tunelab.strategies import get_strategy

    raw = tiny_config(
        tiny_llama,
        memo_data,
        tmp_path / "run",
        ["prefix", {"name": "layerwise", "blocks": [0, 1], "lr": 4e-4, "lr_decay": 0.5}],
        max_steps=1,
    )
    raw["training"].pop("lr", None)
    if training_lr is not None:
        raw["training"]["lr"] = training_lr
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    want = {k: get_strategy("prefix").default_lr if v == "default" else v for k, v in want.items()}

    session = Session(load_config(path), main=True, run_dir=tmp_path / "run")
    session.load()
    trainer = fitter.trainer(session, session.ctx.load_rows(str(memo_data)), None, tmp_path / "run")
    groups = {}
    for g in trainer.create_optimizer().param_groups:  # split by weight decay: a name may come twice
        assert groups.setdefault(g["name"], g["lr"]) == g["lr"]
    assert groups == pytest.approx(want)
    assert trainer.args.learning_rate == pytest.approx(want["prefix"])  # the first component's, in phase order
    assert trainer.learning_rates() == pytest.approx({"prefix": want["prefix"], "layerwise": 4e-4})


def test_the_core_contract_is_small_and_every_other_hook_is_a_typed_capability():
    """Strategy keeps at most 15 public members (its instance's config included); a hook the stack calls
    beyond them belongs to a protocol of tunelab.strategies.capabilities, which the stack discovers."""
    import inspect

    from tunelab.strategies import capabilities as caps
    from tunelab.strategies import registered
    from tunelab.strategies.base import Strategy

    core = {m for m in dir(Strategy) if not m.startswith("_")} | {"name", "config"}
    assert len(core) <= 15, sorted(core)
    protocols = [
        c
        for _, c in inspect.getmembers(caps, inspect.isclass)
        if getattr(c, "_is_protocol", False) and c.__module__ == caps.__name__
    ]
    hooks = {m for p in protocols for m in p.__dict__ if not m.startswith("_")}
    for cls in registered().values():
        for p in protocols:  # a strategy with a capability's methods has the capability, and says so
            members = {m for m in p.__dict__ if not m.startswith("_") and callable(getattr(p, m, None))}
            if all(hasattr(cls, m) for m in members):
                assert issubclass(cls, p), f"{cls.name} implements {p.__name__} without declaring it"
        stray = {m for m in hooks if hasattr(cls, m)} - {
            m for p in protocols if issubclass(cls, p) for m in p.__dict__
        }
        assert stray == set(), f"{cls.name} has hooks of a capability it does not declare: {stray}"
