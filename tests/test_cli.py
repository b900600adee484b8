"""The CLI end to end on a tiny model: train, eval, generate, merge; files written and metrics logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import tiny_config


def tunelab(*args, cwd=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_cli_train_eval_generate_merge(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=30, lr=2e-2, schedule="constant")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    p = tunelab("train", str(cfg_path), "--set", "eval.before=true", "--set", "strategy.r=8")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    assert "trained lora: 30 steps" in p.stdout and f"outputs: {run}" in p.stdout
    for name in (
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
        "model/adapter_config.json",
        "model/adapter_model.safetensors",
        "model/tokenizer.json",
    ):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["strategy"][0]["r"] == 8  # --set reached the run
    s = json.loads((run / "summary.json").read_text())
    assert s["eval"]["loss"] < s["eval_before"]["loss"]
    assert s["eval"]["exact_match"] >= s["eval_before"]["exact_match"]
    # progress bar shows loss and tokens/s
    assert "tok_s=" in p.stderr and "loss=" in p.stderr
    assert "Warning" not in p.stderr, p.stderr[-3000:]  # no library deprecation noise in a normal run

    p = tunelab("eval", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads(p.stdout)
    assert abs(metrics["loss"] - s["eval"]["loss"]) < 1e-3  # the reloaded adapter scores as the trained one
    assert metrics["exact_match"] == s["eval"]["exact_match"]

    # the untouched model as a baseline (fp32 as the run was, so the numbers compare exactly)
    p = tunelab("eval", str(tiny_llama), "--data", str(memo_data), "--set", "training.precision=fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    assert abs(json.loads(p.stdout)["loss"] - s["eval_before"]["loss"]) < 1e-3

    p = tunelab("generate", str(run), "what is the colour of the sky ?", "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()  # the memorised answer is "blue"; a 2-layer toy may not get it, but answers

    p = tunelab("merge", str(run), str(tmp_path / "merged"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    p = tunelab("eval", str(tmp_path / "merged"), "--data", str(memo_data), "--set", "training.precision=fp32")
    assert abs(json.loads(p.stdout)["loss"] - s["eval"]["loss"]) < 1e-3


def test_cli_errors_are_one_clear_line_and_exit_2(tiny_llama, memo_data, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora")))
    p = tunelab("train", str(cfg_path), "--set", "training.epochs=-1")
    assert p.returncode == 2
    assert "training.epochs: Input should be greater than 0 (got -1)" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a config that failed validation

    p = tunelab("train", str(cfg_path), "--set", "model=/nowhere/model")
    assert p.returncode == 2 and "model '/nowhere/model' is neither a known name" in p.stderr
    assert not (tmp_path / "run").exists()  # a setup that failed leaves no run dir behind

    p = tunelab("train", str(cfg_path), "--set", "strategy.target_modules=[nope_proj]")
    assert p.returncode == 2 and "could not be applied to this model" in p.stderr and "Traceback" not in p.stderr

    p = tunelab("eval", str(tmp_path / "not-a-run"))
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_strategies_lists_every_registered_strategy_with_phase_summary_and_options():
    from tunelab.strategies import registered

    p = tunelab("strategies")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    for name, cls in registered().items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split()[1] == cls.declares.phase.name.lower() and cls.summary in row
        options = lines[lines.index(row) + 1]
        assert all(f in options for f in cls.Config.model_fields if f != "name")
    p = tunelab("strategies", "lora")
    assert p.returncode == 0 and "  r = 16" in p.stdout and "Rank of the update." in p.stdout
    p = tunelab("strategies", "lorra")
    assert p.returncode == 2 and "unknown strategy 'lorra'; registered: adapters" in p.stderr


def test_every_verb_comes_from_the_one_table():
    from tunelab.cli import VERBS, _parser

    sub = next(a for a in _parser()._actions if a.dest == "verb")
    assert list(sub.choices) == list(VERBS)
    assert {"train", "validate", "eval", "generate", "merge", "export", "strategies", "demo"} <= set(VERBS)
    import tunelab

    assert all(hasattr(tunelab, name) for name in tunelab.__all__)  # the API the package says it has


def test_quiet_says_the_result_only_and_verbose_says_more(tiny_llama, memo_data, tmp_path):
    runs = {}
    for flags in (["-q"], [], ["--verbose"]):
        name = "".join(flags).strip("-") or "normal"
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / name, "lora", max_steps=2)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        # -q before the verb, --verbose after it: both places work
        args = (
            [*flags, "train", str(tmp_path / f"{name}.yaml")]
            if name == "q"
            else ["train", str(tmp_path / f"{name}.yaml"), *flags]
        )
        runs[name] = p = tunelab(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "trained lora: 2 steps" in p.stdout  # the result, whatever the verbosity
    quiet, normal, verbose = runs["q"], runs["normal"], runs["verbose"]
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]  # no bar, no library progress, no warning
    assert "{'loss'" not in quiet.stdout and "{'loss'" not in normal.stdout  # no Trainer log dicts printed
    assert "it/s" in normal.stderr or "s/it" in normal.stderr  # the training bar
    assert len(verbose.stderr) > len(normal.stderr)  # the libraries' info logs
    p = tunelab("train", str(tmp_path / "q.yaml"), "-q", "-v")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


def test_validate_checks_a_comparison_grid_as_compare_would(tiny_llama, memo_data, tmp_path):
    base = tiny_config(tiny_llama, memo_data, tmp_path / "unused", "lora")
    del base["output_dir"]
    grid = {
        "base": base,
        "seeds": 2,
        "variants": [
            {"name": "lora", "strategy": {"name": "lora", "r": 8}, "search": {"lr": [1e-3, 1e-2]}},
            {"name": "full", "strategy": "full"},
        ],
        "output_dir": str(tmp_path / "cmp"),
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    p = tunelab("validate", str(path))
    assert p.returncode == 0, p.stderr[-2000:]
    line = p.stdout.strip()
    assert line.startswith(f"{path}: ok (comparison of 3 variants (")  # with the zero-shot baseline row
    assert "2 seeds" in line and "searching lora" in line and "6 runs" in line, line
    assert not (tmp_path / "cmp").exists()  # validating writes nothing

    grid["variants"][0]["search"] = {"lr": [], "rank": [4]}  # an empty list and a knob LoRA does not have
    path.write_text(yaml.safe_dump(grid))
    p = tunelab("validate", str(path))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert str(path) in p.stderr and "variant lora" in p.stderr

    p = tunelab("validate", str(path), "--set", "training.lr=1e-3")
    assert p.returncode == 2 and "--set changes a run config" in p.stderr and "Traceback" not in p.stderr
