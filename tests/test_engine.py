"""The engine: run directory, logs, determinism, resume after a kill, multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import crash_at, final_weights, tiny_config
from tunelab.run import RunError, train


def test_run_dir_holds_config_logs_weights_and_summary(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=6, eval_steps=3)
    result = train(cfg)
    run = result.run_dir
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["strategy"][0]["name"] == "lora" and saved["strategy"][0]["r"] == 16  # defaults resolved
    assert saved["training"]["max_steps"] == 6
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 6]
    assert any("eval_loss" in r for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    s = json.loads((run / "summary.json").read_text())
    assert s == result.summary
    assert s["train"]["steps"] == 6 and s["train"]["tokens_seen"] > 0 and s["train"]["tokens_per_s"] > 0
    assert 0 < s["parameters"]["trainable"] < s["parameters"]["total"]
    assert s["memory"]["peak_mb"] > 0 and s["wall_time_s"] > 0
    assert {"loss", "perplexity", "exact_match", "samples"} <= set(s["eval"])
    assert s["data"]["train"] == {"rows": 16, "used": 16, "skipped": 0, "skip_reasons": []}
    assert (run / "model" / "tokenizer.json").is_file()


def test_tokens_seen_counts_non_padding_tokens(tiny_llama, memo_data, tmp_path):
    # one epoch over 16 rows: tokens seen equals the tokens of the 16 rows, no padding counted
    from tunelab.config import DataConfig
    from tunelab.data import prepare_file
    from tunelab.models import load_tokenizer

    prepared = prepare_file(memo_data, load_tokenizer(tiny_llama), DataConfig(train=str(memo_data)), 64)
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=None, epochs=1)
    cfg["training"].pop("max_steps")
    result = train(cfg)
    assert result.summary["train"]["tokens_seen"] == sum(f["length"] for f in prepared.features)


def test_a_budget_in_tokens_stops_at_the_first_step_reaching_it_and_resumes_to_the_same_step(
    tiny_llama, memo_data, tmp_path
):
    from tunelab.config import DataConfig
    from tunelab.data import prepare_file
    from tunelab.models import load_tokenizer

    lengths = [
        f["length"]
        for f in prepare_file(memo_data, load_tokenizer(tiny_llama), DataConfig(train=str(memo_data)), 64).features
    ]
    budget = int(sum(lengths) * 1.5)  # a budget of one and a half epochs, in tokens
    opts = {"max_steps": None, "max_tokens": budget, "logging_steps": 1, "save_steps": 2, "batch_size": 4}
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "whole", "lora", **opts)
    cfg["training"].pop("max_steps")
    whole = train(cfg)
    seen = [
        r["tokens_seen"]
        for r in map(json.loads, (whole.run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert seen[-1] == whole.summary["train"]["tokens_seen"] >= budget > seen[-2]
    # the schedule's horizon is the budget at the data's mean tokens per step: 16 rows, 4 steps per epoch
    assert whole.summary["train"]["steps"] == len(seen) == 6
    again = train(cfg, resume=True)  # killed after its last checkpoint, before its summary: no step more
    assert again.summary["train"]["resumed_from"] == "checkpoint-6" and again.summary["train"]["steps"] == 6
    cfg["output_dir"] = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[crash_at(3)])
    resumed = train(cfg, resume=True)
    assert resumed.summary["train"]["resumed_from"] == "checkpoint-2"
    assert resumed.summary["train"]["tokens_seen"] == whole.summary["train"]["tokens_seen"]
    w1, w2 = final_weights(whole.run_dir), final_weights(resumed.run_dir)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6, msg=k)


def test_same_seed_same_weights_other_seed_other_weights(tiny_llama, memo_data, tmp_path):
    a = train(tiny_config(tiny_llama, memo_data, tmp_path / "a", "lora", max_steps=4)).run_dir
    b = train(tiny_config(tiny_llama, memo_data, tmp_path / "b", "lora", max_steps=4)).run_dir
    c = train(tiny_config(tiny_llama, memo_data, tmp_path / "c", "lora", max_steps=4, seed=7)).run_dir
    wa, wb, wc = final_weights(a), final_weights(b), final_weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_resume_after_a_kill_gives_the_same_final_weights(strategy, tiny_llama, memo_data, tmp_path):
    opts = {"max_steps": 8, "save_steps": 3, "batch_size": 2, "grad_accum": 2}
    whole = train(tiny_config(tiny_llama, memo_data, tmp_path / "whole", strategy, **opts)).run_dir
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "killed", strategy, **opts)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[crash_at(5)])
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "killed" / "model").exists()  # nothing final was written by the killed run
    resumed = train(cfg, resume=True)
    assert resumed.summary["train"]["resumed_from"] == "checkpoint-3"
    assert resumed.summary["train"]["steps"] == 8
    w1, w2 = final_weights(whole), final_weights(resumed.run_dir)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6, msg=k)


def test_an_existing_run_is_never_overwritten_silently(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(RunError, match="holds a tunelab run; use --resume"):
        train(cfg)
    assert (tmp_path / "run" / "summary.json").read_text() == before
    train(cfg, overwrite=True)
    # --overwrite refuses a directory that is not a tunelab run
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match=r"is not a tunelab run \(no .tunelab-run marker\)"):
        train(tiny_config(tiny_llama, memo_data, other, "lora", max_steps=2), overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_resume_refuses_a_changed_config(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    cfg["training"]["lr"] = 0.5
    with pytest.raises(RunError, match=r"training.lr: was 0.01, now 0.5"):
        train(cfg, resume=True)


def test_bad_data_fails_before_the_model_loads(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    from tunelab.data import DataError

    with pytest.raises(DataError, match="bad.jsonl:2: missing field 'completion'"):
        train(tiny_config(tiny_llama, bad, tmp_path / "run", "lora"))


def test_bf16_mixed_precision_trains_on_this_device(tiny_llama, memo_data, tmp_path):
    result = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=3, precision="bf16"))
    assert result.summary["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in final_weights(result.run_dir).values())  # fp32 master weights


def test_two_process_torchrun_completes_and_only_rank_0_writes(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=4, logging_steps=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "tunelab.cli",
            "train",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["train"]["steps"] == 4
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer: no line twice
    # each optimizer step saw both ranks' batches: 4 steps x 2 ranks x 4 rows = 32 rows = 2 epochs
    assert s["train"]["epochs"] == pytest.approx(2.0)
    assert not list((tmp_path / "run").glob(".model-*"))


def test_peak_memory_is_the_runs_own_not_an_earlier_runs_in_the_same_process(tiny_llama, memo_data, tmp_path):
    # tunelab compare runs variants one after the other in one process: each summary's peak is its own
    from transformers import TrainerCallback

    class Hog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                block = bytearray(600 * 2**20)  # 600 MiB, touched so that it is resident
                block[::4096] = b"x" * len(block[::4096])
                del block

    big = train(tiny_config(tiny_llama, memo_data, tmp_path / "big", "lora", max_steps=2), callbacks=[Hog()])
    small = train(tiny_config(tiny_llama, memo_data, tmp_path / "small", "lora", max_steps=2))
    assert big.summary["memory"]["peak_mb"] - small.summary["memory"]["peak_mb"] > 400
