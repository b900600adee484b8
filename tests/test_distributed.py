"""Several processes (``training.distributed``): DDP and FSDP2 on CPU (gloo, 2 processes under torchrun) train
as one process does on the same global batch; FSDP's sharded checkpoints resume bit-identically after a
kill -9; what cannot train distributed is refused before anything loads, in one line. DeepSpeed and FSDP on
CUDA run where 2 GPUs are (skipped here, saying so)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import WORDS, final_weights, tiny_config, write_jsonl
from tunelab.checkpoints import inspect
from tunelab.config import ConfigError, load_config
from tunelab.run import RunError, train

CPU = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
COMMON = {"max_steps": 4, "logging_steps": 1, "lr": 1e-2}
HYBRID = [{"name": "adapters", "bottleneck": 8}, {"name": "lora", "r": 8, "dropout": 0.0}]  # no dropout: every
# process would draw its own masks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cpu: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """2 processes on this machine (on CPU, or a GPU each): ``args`` is a script or ``-m module ...``."""
    port = str(free_port())
    env = {**({**os.environ, **CPU} if cpu else os.environ), **(env or {})}
    if not cpu:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def assert_same_training(one: Path, two: Path, atol: float) -> None:
    assert len(losses(one)) >= 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=atol, msg=k)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """40 rows of different lengths: length grouping decides which rows share a step."""
    data = [
        {"prompt": " ".join(WORDS[i % 20 : i % 20 + 1 + (i * 7) % 13]), "completion": WORDS[(i + 3) % 20]}
        for i in range(40)
    ]
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", data)


@pytest.fixture(scope="module")
def one_process(tiny_llama, rows, tmp_path_factory) -> dict[str, Path]:
    """Each strategy trained by one process with the global batch (4)."""
    out = tmp_path_factory.mktemp("one")
    return {
        name: train(tiny_config(tiny_llama, rows, out / name, spec, batch_size=4, **COMMON)).run_dir
        for name, spec in {"full": "full", "adapters + lora": HYBRID}.items()
    }


@pytest.mark.parametrize(
    "mode, strategy, atol",
    [("ddp", "full", 1e-5), ("fsdp", "full", 1e-5), ("fsdp", "adapters + lora", 1e-4)],
)
def test_two_processes_train_as_one_process_on_the_same_global_batch(
    mode, strategy, atol, one_process, tiny_llama, rows, tmp_path
):
    """2 processes x batch 2 see, step by step, the rows 1 process x batch 4 sees: the same logged losses and
    the same final weights. DDP: each process holds the whole model; FSDP2: each holds half of every layer's
    weights, gradients and optimizer state (its checkpoint is sharded, one file per process), and the model
    is gathered whole for the scores and the artefact. (Length grouping sorts megabatches of a whole global
    batch's multiple: grouped per process, 40 rows would fall into megabatches of 10, which straddle global
    batches of 4 and move rows between optimizer steps.)"""
    spec = {"full": "full", "adapters + lora": HYBRID}[strategy]
    cfg = tiny_config(tiny_llama, rows, tmp_path / "two", spec, batch_size=2, distributed=mode, **COMMON)
    proc = torchrun("-m", "tunelab.cli", "train", str(write(cfg, tmp_path / "two.yaml")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(one_process[strategy], tmp_path / "two", atol)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    one = json.loads((one_process[strategy] / "summary.json").read_text())
    assert s["distributed"] == mode and s["world_size"] == 2
    assert s["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-4)  # scored on the gathered model
    if mode == "fsdp":
        ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-4"
        assert inspect(ckpt).complete, inspect(ckpt).problem
        assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # a shard per process
        assert not (ckpt / "model.safetensors").exists()  # no whole copy gathered for a checkpoint
        assert "shards" in s["levers"]["why"]["loss_head"]  # the levers that need whole weights stay off
        (ckpt / "optimizer_0" / ".metadata").unlink()  # as if a process died before the optimizer's shards
        assert "optimizer_0" in inspect(ckpt).problem  # were all written: not resumed from


def test_a_deepspeed_checkpoint_is_complete_with_its_states_folder(tmp_path):
    """DeepSpeed's layout (its ``latest`` file names the folder of model and optimizer states; the Trainer adds
    the trainer state and RNG states): complete, and not without the optimizer states. (DeepSpeed itself runs
    on CUDA only: test_two_gpus_train_as_one_gpu writes real ones.)"""
    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step4")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (ckpt / "rng_state_0.pth").write_bytes(b"")
    (ckpt / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert "optimizer states missing" in inspect(ckpt).problem
    (ckpt / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert inspect(ckpt).complete, inspect(ckpt).problem


def at_step_5(tmp_path: Path, cfg: Path, action: str) -> Path:
    """A script for torchrun: each process runs ``tunelab -q train CFG`` (the real CLI, its error lines and
    exit codes) and does ``action``, a Python expression, at the end of step 5."""
    driver = tmp_path / "at_step_5.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            from transformers import TrainerCallback
            import tunelab.cli, tunelab.run
            class AtStep5(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == 5:
                        {action}
            plain = tunelab.run.train
            tunelab.run.train = lambda *a, **kw: plain(*a, callbacks=[AtStep5()], **kw)
            sys.exit(tunelab.cli.main(["-q", "train", {str(cfg)!r}]))
            """
        )
    )
    return driver


def test_fsdp_kill_9_then_resume_gives_bit_identical_weights(tiny_llama, rows, tmp_path):
    """Rank 0 SIGKILLed after step 5 (torchrun then stops the other): --resume continues both processes from
    their shards of checkpoint-4 and ends with exactly the weights of an uninterrupted run; a resume that would
    not shard the same way is refused."""
    opts = {**COMMON, "max_steps": 8, "save_steps": 4}
    whole = tiny_config(tiny_llama, rows, tmp_path / "whole", "full", batch_size=2, distributed="fsdp", **opts)
    assert torchrun("-m", "tunelab.cli", "-q", "train", str(write(whole, tmp_path / "whole.yaml"))).returncode == 0
    # the killed run's FSDP comes from the launch, as from an accelerate config (distributed: auto)
    killed_cfg = tiny_config(tiny_llama, rows, tmp_path / "killed", "full", batch_size=2, **opts)
    cfg = write(killed_cfg, tmp_path / "killed.yaml")
    launch = {"ACCELERATE_USE_FSDP": "true"}
    driver = at_step_5(tmp_path, cfg, 'os.environ["RANK"] == "0" and os.kill(os.getpid(), signal.SIGKILL)')
    killed = torchrun(str(driver), env=launch)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    with pytest.raises(RunError, match="checkpoint-4 was written fsdp-sharded, and this run trains with"):
        train(str(cfg), resume=True)  # one process, without the launch's FSDP, cannot read the shards of two
    resumed = torchrun("-m", "tunelab.cli", "train", str(cfg), "--resume", env=launch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from checkpoint-4" in resumed.stdout
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["distributed"] == "fsdp"


# what one process does at step 5 of 8, inside the real CLI (`tunelab train CFG`): rank 1 kills itself with
# SIGKILL (a worker lost to the OOM killer or a crash); rank 0 sends SIGTERM to the launcher (a scheduler's
# stop) and waits for what torchrun then does to it
FAULTS = {
    "kill -9 a worker": 'os.environ["RANK"] == "1" and os.kill(os.getpid(), signal.SIGKILL)',
    "SIGTERM the launcher": (
        'os.environ["RANK"] == "0" and (os.kill(os.getppid(), signal.SIGTERM), time.sleep(60))'
    ),
}
FAULT_RUN = {**COMMON, "max_steps": 8, "save_steps": 4, "batch_size": 2, "distributed": "ddp"}


@pytest.fixture(scope="module")
def ddp_whole(tiny_llama, rows, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run the faulted ones must end equal to."""
    d = tmp_path_factory.mktemp("ddp-whole")
    cfg = write(tiny_config(tiny_llama, rows, d / "whole", "full", **FAULT_RUN), d / "whole.yaml")
    assert torchrun("-m", "tunelab.cli", "-q", "train", str(cfg)).returncode == 0
    return d / "whole"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_under_torchrun_stops_every_process_in_one_line_and_resume_is_exact(
    fault, ddp_whole, tiny_llama, rows, tmp_path
):
    """The processes left stop within seconds (torchrun stops them; the one whose collective fails first
    says so), each with one line, the run records `interrupted`, and `--resume` under torchrun ends with
    exactly the weights and losses of an uninterrupted 2-process run."""
    cfg = write(
        tiny_config(tiny_llama, rows, tmp_path / "faulted", "full", **FAULT_RUN), tmp_path / "faulted.yaml"
    )
    driver = at_step_5(tmp_path, cfg, FAULTS[fault])
    t0 = time.monotonic()
    faulted = torchrun(str(driver))
    assert faulted.returncode != 0 and time.monotonic() - t0 < 120
    said = [x for x in faulted.stderr.splitlines() if x.startswith("tunelab train")]
    # rank 0 names the checkpoint to resume from, whether its collective failed (exit 4) or torchrun's SIGTERM
    # reached it first (130); the other survivor, if any, says it stopped too
    first = [x for x in said if x.startswith("tunelab train: error: ")]
    assert len(first) == 1, faulted.stderr[-3000:]
    assert "can continue from checkpoint-4 with --resume" in first[0], first
    assert "interrupted; " in first[0] or "another process of this run stopped (" in first[0], first
    assert len(said) == {"kill -9 a worker": 1, "SIGTERM the launcher": 2}[fault], said
    assert json.loads((tmp_path / "faulted" / ".tunelab-run").read_text())["status"] == "interrupted"
    resumed = torchrun("-m", "tunelab.cli", "train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from checkpoint-4" in resumed.stdout
    a, b = final_weights(ddp_whole), final_weights(tmp_path / "faulted")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert losses(tmp_path / "faulted") == losses(ddp_whole)


CLS_ROWS = [{"text": "good movie", "label": "positive"}, {"text": "bad book", "label": "negative"}]


PER_TASK = [{"name": "lora", "r": 4, "per_task": True, "dropout": 0.0}, {"name": "adapters", "per_task": True}]


@pytest.mark.parametrize(
    "mode, strategy",
    [("ddp", PER_TASK), ("fsdp", [{"name": "lora", "dropout": 0.0}, "heads"])],
    ids=["ddp-per-task-lora-adapters", "fsdp-lora-heads"],
)
def test_multitask_trains_in_two_processes_as_in_one(mode, strategy, tiny_llama, tmp_path):
    """Each optimizer step's rows come from one task in every process (the task sampler draws global batches),
    and the main process's scoring before training leaves every per-task part as trainable as the others'
    (PEFT's set_adapter marks only the active adapter's weights trainable; DDP then refused the run:
    "Rank 1 has 72 params, while rank 0 has inconsistent 44 params")."""
    from conftest import MEMO_ROWS

    qa = write_jsonl(tmp_path / "qa.jsonl", MEMO_ROWS * 4)
    cls = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS * 4)
    tasks = [{"name": n, "train": str(f), "eval": str(f)} for n, f in (("qa", qa), ("cls", cls))]

    def config(name: str, batch: int, distributed: str) -> dict:
        t = {"max_steps": 6, "batch_size": batch, "lr": 2e-2, "logging_steps": 1, "save_steps": 100}
        t.update(precision="fp32", max_length=64, schedule="constant", distributed=distributed)
        return {
            "model": str(tiny_llama),
            "mode": "multitask",
            "tasks": tasks,
            "strategy": strategy,
            "training": t,
            "multitask": {"sampling": "uniform"},
            "eval": {"max_new_tokens": 4, "batch_size": 8},
            "output_dir": str(tmp_path / name),
        }

    train(config("one", 4, "auto"))
    proc = torchrun("-m", "tunelab.cli", "-q", "train", str(write(config("two", 2, mode), tmp_path / "two.yaml")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per-task adapters: the inactive task's weights get no gradient, and AdamW's first steps on the
    # near-zero gradients of the others amplify summation-order differences to ~2e-4
    assert_same_training(tmp_path / "one", tmp_path / "two", atol=1e-3)


# -- refused before anything loads ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, training, mode, match",
    [
        (["full", "ewc"], {"distributed": "fsdp"}, None, "strategy ewc cannot train with distributed: fsdp"),
        (["full", "l2sp"], {"distributed": "deepspeed"}, None, "strategy l2sp cannot train with distributed"),
        ({"name": "prefix"}, {"distributed": "fsdp"}, None, "prefix cannot train with distributed: fsdp"),
        ({"name": "peft", "type": "prompt_tuning"}, {"distributed": "fsdp"}, None, "peft cannot train"),
        ({"name": "layerwise", "top": 1, "unfreeze_every_steps": 2}, {"distributed": "fsdp"}, None, "unfreezing"),
        (["lora", {"name": "distill", "on_policy": 0.5}], {"distributed": "fsdp"}, None, "on-policy"),
        (["full", "l2"], {"distributed": "deepspeed"}, None, "flat partitions"),
        (["lora", "heads"], {"distributed": "ddp"}, "multitask", "heads cannot train with distributed: ddp"),
        ("lora", {"distributed": "fsdp"}, "continual", "continual learning"),
        ("lora", {"distributed": "fsdp", "loss_head": "positions"}, None, "loss_head: positions cannot be used"),
        ("lora", {"distributed": "fsdp", "compile": "on"}, None, "compile: on cannot be used"),
        ("lora", {"distributed": "fsdp", "lora_kernel": "fused"}, None, "lora_kernel: fused cannot be used"),
        ("lora", {"distributed": "fsdp", "zero_stage": 2}, None, "zero_stage is for distributed: deepspeed"),
    ],
)
def test_what_cannot_train_distributed_is_refused_at_validation(strategy, training, mode, match, tmp_path):
    cfg = {"data": {"train": "x.jsonl"}, "strategy": strategy, "training": training}
    if mode == "multitask":
        cfg = {"mode": "multitask", "tasks": [{"name": n, "train": "x.jsonl", "eval": "x.jsonl"} for n in "ab"]}
        cfg.update(strategy=strategy, training=training)
    if mode == "continual":
        cfg = {"tasks": [{"name": n, "train": "x.jsonl", "eval": "x.jsonl"} for n in "ab"], "training": training}
        cfg["strategy"] = strategy
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_the_mode_a_launch_chooses_is_checked_like_a_configured_one(tiny_llama, memo_data, tmp_path, monkeypatch):
    """``auto`` under torchrun (DDP) or an accelerate launch config (FSDP, DeepSpeed) gets the same refusals, at
    the start of the run; the sharded modes refuse a single process and DeepSpeed refuses a CPU."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RunError, match="this launch trains in 2 processes with fsdp: strategy ewc cannot"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "a", ["full", "ewc"]))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(RunError, match="with ddp: strategy heads cannot train"):
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / "b", ["lora", "heads"])
        cfg.update(
            mode="multitask",
            data=None,
            tasks=[{"name": n, "train": str(memo_data), "eval": str(memo_data)} for n in "ab"],
        )
        train(cfg)
    with pytest.raises(RunError, match="deepspeed needs CUDA GPUs"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "c", "lora", distributed="deepspeed"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RunError, match="this run has one: start it with torchrun"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "d", "lora", distributed="fsdp"))
    assert not (tmp_path / "d").exists()  # refused before the run directory was claimed


# -- CUDA: FSDP and DeepSpeed where 2 GPUs are ----------------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (none on this machine)")


@two_gpus
@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_two_gpus_train_as_one_gpu(mode, one_process, tiny_llama, rows, tmp_path):
    if mode == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the deepspeed package is not installed")
    cfg = tiny_config(tiny_llama, rows, tmp_path / "two", "full", batch_size=2, distributed=mode, **COMMON)
    proc = torchrun("-m", "tunelab.cli", "train", str(write(cfg, tmp_path / "two.yaml")), cpu=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(one_process["full"]), rel=1e-3)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["distributed"] == mode
