"""Config validation: every problem named with file, line, key and what is allowed; overrides; examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.strategies import Strategy, StrategyConfig, register_strategy, registered

GOOD = """\
model: smollm2-135m-instruct
data:
  train: train.jsonl
strategy:
  name: lora
  r: 8
training:
  max_steps: 10
  lr: 1.0e-4
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def problems(tmp_path, text, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    return e.value.problems


def test_good_config_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.strategy_names() == ["lora"]
    assert cfg.strategy[0].r == 8 and cfg.strategy[0].alpha == 32
    assert cfg.training.batch_size == 8 and cfg.training.lr == 1e-4
    resolved = cfg.to_dict()
    assert resolved["strategy"][0]["target_modules"] == "all-linear"
    # the resolved config loads back to the same config
    assert load_config(resolved).to_dict() == resolved


def test_model_defaults_to_smollm2(tmp_path):
    cfg = load_config({"data": {"train": "x.jsonl"}})
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.strategy_names() == ["lora"]


def test_unknown_key_names_line_allowed_keys_and_suggestion(tmp_path):
    text = GOOD.replace("  max_steps: 10", "  max_step: 10")
    (p,) = problems(tmp_path, text)
    assert "cfg.yaml:8: training.max_step: unknown key; allowed: epochs, max_steps" in p
    assert "did you mean 'max_steps'?" in p


def test_unknown_strategy_option_names_the_strategy_key(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("  r: 8", "  rank: 8"))
    assert "cfg.yaml:6: strategy.rank: unknown key" in p


def test_wrong_type_and_out_of_range_are_all_reported(tmp_path):
    text = GOOD.replace("lr: 1.0e-4", "lr: -1").replace("max_steps: 10", "max_steps: ten")
    ps = problems(tmp_path, text)
    assert len(ps) == 2
    assert any("cfg.yaml:8: training.max_steps: Input should be a valid integer" in p and "'ten'" in p for p in ps)
    assert any("cfg.yaml:9: training.lr: Input should be greater than 0 (got -1)" in p for p in ps)


def test_bad_choice_lists_allowed_values(tmp_path):
    (p,) = problems(tmp_path, GOOD + "  schedule: sawtooth\n")
    assert "training.schedule" in p and "'linear'" in p and "'cosine'" in p


def test_missing_data_and_unknown_strategy(tmp_path):
    (p,) = problems(tmp_path, "strategy: loraa\n")
    assert "unknown strategy 'loraa'; registered: adapters, distill, dropout, ewc, full, heads, ia3, l2" in p
    (p,) = problems(tmp_path, "model: x\n")
    assert "give either data (one training set) or tasks" in p


def test_cross_field_checks(tmp_path):
    ps = problems(
        tmp_path, GOOD.replace("  train: train.jsonl", "  train: t.jsonl\n  eval: e.jsonl\n  eval_split: 0.1")
    )
    assert any("either data.eval" in p for p in ps)


TASKS = """\
tasks:
  - {name: a, train: a.jsonl, eval: a.jsonl}
  - {name: b, train: b.jsonl, eval: b.jsonl}
"""


@pytest.mark.parametrize(
    "text, line, key, says",
    [
        (GOOD + "continual: {per_task_adapter: true}\n", 10, "continual.per_task_adapter", "only mode: continual"),
        (GOOD + "multitask: {sampling: uniform}\n", 10, "multitask.sampling", "only mode: multitask"),
        (TASKS + "forgetting: {original_tasks: [o.jsonl]}\n", 4, "forgetting.original_tasks", "does not score"),
        (TASKS + "training: {eval_steps: 5}\n", 4, "training.eval_steps", "once it is trained"),
        (GOOD.replace("strategy:\n  name: lora\n  r: 8", "strategy: full") + "  frozen_weights: bf16\n", 8,
         "training.frozen_weights", "full, which changes base weights"),
        (GOOD + "  frozen_weights: bf16\n  precision: fp32\n", 10, "training.frozen_weights", "not fp32"),
        (GOOD.replace("strategy:\n  name: lora\n  r: 8", "strategy: [lora,\n  {name: replay, retention: false}]"),
         5, "strategy.1", "replay.retention: false leaves only earlier tasks' rows"),
    ],
)  # fmt: skip
def test_an_option_the_run_would_ignore_or_refuse_after_loading_is_refused_at_validation(
    tmp_path, text, line, key, says
):
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'cfg.yaml'}:{line}: {key}: ") and says in problem, problem


def test_the_same_options_where_they_apply_validate(tmp_path):
    load_config(write(tmp_path, TASKS + "continual: {per_task_adapter: true}\n"))
    load_config(write(tmp_path, TASKS + "mode: multitask\ntraining: {eval_steps: 5}\n"))
    load_config(write(tmp_path, TASKS + "mode: multitask\nmultitask: {sampling: uniform}\n"))
    load_config(write(tmp_path, GOOD + "forgetting: {original_tasks: [o.jsonl]}\n"))
    load_config(write(tmp_path, GOOD + "  frozen_weights: bf16\n"))  # lora: its frozen weights may be bf16
    load_config(write(tmp_path, GOOD + "continual: {per_task_adapter: false}\n"))  # the default, said aloud
    load_config(write(tmp_path, TASKS + "strategy: [lora, {name: replay, retention: false}]\n"))  # earlier tasks


def test_not_yaml_and_not_a_mapping(tmp_path):
    (p,) = problems(tmp_path, "data: [unclosed\n")
    assert "cfg.yaml:" in p and "not valid YAML" in p
    (p,) = problems(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in p


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_with_types(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD),
        ["training.lr=3e-4", "strategy.r=4", "training.precision=fp32", "data.skip_bad_rows=true"],
    )
    assert cfg.training.lr == 3e-4 and cfg.strategy[0].r == 4
    assert cfg.training.precision == "fp32" and cfg.data.skip_bad_rows is True


def test_set_on_a_shorthand_strategy(tmp_path):
    cfg = load_config({"data": {"train": "x"}, "strategy": "lora"}, ["strategy.r=2"])
    assert cfg.strategy[0].r == 2


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, GOOD), ["training.lr"])
    with pytest.raises(ConfigError, match=r"training.lr: Input should be greater than 0"):
        load_config(write(tmp_path, GOOD), ["training.lr=0"])


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    assert main(["validate", str(good)]) == 0
    assert "ok (single: lora" in capsys.readouterr().out
    assert main(["validate", str(good), "--set", "training.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "training.batch_size: Input should be greater than 0" in err


def test_registry_refuses_duplicates_and_malformed_names():
    class Dup(Strategy):
        name = "lora"

    with pytest.raises(ValueError, match="already registered"):
        register_strategy(Dup)

    class Bad(Strategy):
        name = "Bad Name"

    with pytest.raises(ValueError, match="must match"):
        register_strategy(Bad)

    class NoConfig(Strategy):
        name = "noconfig_x"
        Config = dict

    with pytest.raises(TypeError, match="must subclass StrategyConfig"):
        register_strategy(NoConfig)
    assert "noconfig_x" not in registered()
    assert issubclass(registered()["lora"].Config, StrategyConfig)


@pytest.mark.parametrize(
    ("combo", "reason"),
    [
        (["full", "lora"], "'full' trains every parameter, so combining it with lora adds nothing"),
        (["lora", "ia3"], "at most one PEFT tuner"),
        (["prefix", "prompt"], "at most one PEFT prompt learner"),
        (["lora", {"name": "peft", "type": "loha"}], "at most one PEFT tuner"),
        (["lora", "lora"], "a strategy appears twice"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_the_reason(combo, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config({"data": {"train": "x"}, "strategy": combo})


def test_hybrids_validate_and_apply_in_phase_order():
    from tunelab.strategies import build_strategies

    cfg = load_config({"data": {"train": "x"}, "strategy": [{"name": "layerwise", "top": 2}, "prefix", "lora"]})
    assert cfg.strategy_names() == ["layerwise", "prefix", "lora"]
    assert [s.name for s in build_strategies(cfg.strategy)] == ["lora", "prefix", "layerwise"]


def test_peft_pass_through_checks_options_against_the_peft_config():
    cfg = load_config({"data": {"train": "x"}, "strategy": {"name": "peft", "type": "loha", "r": 4}})
    assert cfg.strategy[0].options() == {"r": 4}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rank'\] for PEFT LoHaConfig"):
        load_config({"data": {"train": "x"}, "strategy": {"name": "peft", "type": "loha", "rank": 4}})
    with pytest.raises(ConfigError, match="unknown PEFT method 'nope'"):
        load_config({"data": {"train": "x"}, "strategy": {"name": "peft", "type": "nope"}})


def test_layerwise_options_are_checked():
    def err(**opts):
        with pytest.raises(ConfigError) as e:
            load_config({"data": {"train": "x"}, "strategy": {"name": "layerwise", **opts}})
        return str(e.value)

    assert "choose what trains" in err()
    assert "either top or blocks" in err(top=2, blocks=[1])
    assert "unknown kind(s) ['ffn']" in err(top=1, kinds=["ffn"])
    assert "use an index" in err(blocks=["a-b"])


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.strategy_names()


def test_there_are_example_configs():
    assert len(EXAMPLES) >= 2


def _word_options() -> list[tuple[str, str]]:
    """Every option whose allowed values are words (a Literal of strings), as (dotted key, word): the run
    config's sections and every registered strategy's options."""
    import typing

    from pydantic import BaseModel

    def words(annotation) -> set[str]:
        if typing.get_origin(annotation) is typing.Literal:
            return {a for a in typing.get_args(annotation) if isinstance(a, str)}
        return (
            set().union(*(words(a) for a in typing.get_args(annotation))) if typing.get_args(annotation) else set()
        )

    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            out.extend((f"{prefix}{name}", w) for w in sorted(words(ann)))

    from tunelab.config import MODE_CONFIGS

    for cls in MODE_CONFIGS.values():  # each mode's own options too
        walk(cls, "")
    for cls in registered().values():
        walk(cls.Config, f"strategy.{cls.name}.")
    return out


def test_every_word_an_option_allows_reads_as_that_word_unquoted(tmp_path):
    """YAML 1.1 reads on/off/yes/no/y/n as booleans: `compile: off` reached validation as False. tunelab's
    reader keeps them strings, in files and through --set, for every option whose values are words."""
    from tunelab.config import parse_override, safe_load

    options = _word_options()
    assert ("training.compile", "off") in options and len(options) > 30
    for key, word in options:
        assert safe_load(f"{key.rsplit('.', 1)[-1]}: {word}\n") == {key.rsplit(".", 1)[-1]: word}, key
        assert parse_override(f"{key}={word}") == (key, word)
    # end to end: the documented spelling, in a file and through --set, and True/False from another reader
    cfg = load_config(write(tmp_path, GOOD + "  compile: off\n"))
    assert cfg.training.compile == "off"
    assert load_config(write(tmp_path, GOOD), ["training.compile=on"]).training.compile == "on"
    assert load_config({"data": {"train": "t.jsonl"}, "training": {"compile": False}}).training.compile == "off"
    # yes/no options still take the words, and true/false stay booleans
    c = load_config(write(tmp_path, GOOD), ["forgetting.enabled=off", "allow_pickle=yes"])
    assert c.forgetting.enabled is False and c.allow_pickle is True
    assert safe_load("a: true\nb: False\nc: yes\nd: null\n") == {"a": True, "b": False, "c": "yes", "d": None}


def test_the_config_is_a_union_on_mode_so_a_modes_options_exist_only_in_it(tmp_path):
    from tunelab.config import ContinualRunConfig, MultitaskRunConfig, RunConfig, SingleRunConfig

    single = load_config(write(tmp_path, GOOD))
    multitask = load_config(write(tmp_path, TASKS + "mode: multitask\nmultitask: {sampling: uniform}\n"))
    continual = load_config(write(tmp_path, TASKS + "continual: {per_task_adapter: true}\n"))
    assert type(single) is SingleRunConfig and type(multitask) is MultitaskRunConfig
    assert type(continual) is ContinualRunConfig and all(isinstance(c, RunConfig) for c in (single, continual))
    assert not hasattr(single, "continual") and not hasattr(single, "multitask")
    assert multitask.multitask.sampling == "uniform" and not hasattr(multitask, "continual")
    assert continual.continual.per_task_adapter and not hasattr(continual, "multitask")
    assert "continual" not in single.to_dict() and "multitask" in multitask.to_dict()
    # the resolved config.yaml of an older single run listed the other modes' defaults: it still loads
    old = {**single.to_dict(), "continual": {"per_task_adapter": False}, "multitask": {"sampling": "proportional"}}
    assert type(load_config(old)) is SingleRunConfig
    # errors inside a mode's class name the key and its line, as anywhere else
    (p,) = problems(tmp_path, TASKS + "mode: multitask\nmultitask:\n  temperature: 0.5\n")
    assert p.startswith(
        f"{tmp_path / 'cfg.yaml'}:6: multitask.temperature: Input should be greater than or equal to 1"
    )
    (p,) = problems(tmp_path, GOOD + "mode: sequential\n")
    modes = "'single', 'multitask', 'continual'"
    assert p == f"{tmp_path / 'cfg.yaml'}:10: mode: Input should be {modes} (got 'sequential')"
