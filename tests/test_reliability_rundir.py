"""Reliability (issue 7), the run directory: nothing of the user's is ever deleted, an old run is kept until
the new one is known good, one process per run dir, and a failed run never blocks the corrected re-run.

Each test failed on the main branch before this change (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from tunelab.errors import RunError
from tunelab.run import train
from tunelab.rundir import LOCK, MARKER
from tunelab.strategies import StrategyError

BAD_TARGETS = {"name": "lora", "target_modules": ["nope_proj"]}  # fails in setup, after the model loads


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's: it names whoever claimed the directory last."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# ----------------------------------------------------------------------------- 1. data loss


def test_overwrite_of_the_current_directory_deletes_nothing(tiny_llama, memo_data, tmp_path, monkeypatch):
    # A project folder with the user's own config.yaml, data and notes; output_dir: . and --overwrite.
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_bytes(memo_data.read_bytes())
    (project / "config.yaml").write_text("my: config\n")
    (project / "notes.md").write_text("three weeks of notes")
    before = snapshot(project)
    monkeypatch.chdir(project)
    with pytest.raises(RunError, match="not a tunelab run"):
        train(
            tiny_config(tiny_llama, project / "data" / "train.jsonl", Path("."), "lora", max_steps=2),
            overwrite=True,
        )
    assert snapshot(project) == before


def test_overwrite_refuses_a_run_dir_holding_a_user_file(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    (tmp_path / "run" / "analysis.ipynb").write_text("the user's notebook")
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunError, match=r"holds files tunelab did not write \(analysis.ipynb\)"):
        train(cfg, overwrite=True)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("where", ["home", "parent of cwd"])
def test_overwrite_never_replaces_home_or_a_parent_of_the_cwd(where, tiny_llama, memo_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_llama, memo_data, run, "lora", max_steps=2)
    train(cfg)
    if where == "home":
        monkeypatch.setenv("HOME", str(run))
    else:
        monkeypatch.chdir(run / "model")
    before = snapshot(run)
    with pytest.raises(RunError, match="never replaces this directory"):
        train(cfg, overwrite=True)
    assert snapshot(run) == before


def test_the_old_run_is_kept_until_the_new_one_has_loaded(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    before = snapshot(tmp_path / "run")
    with pytest.raises(StrategyError):
        train({**cfg, "strategy": BAD_TARGETS}, overwrite=True)
    assert snapshot(tmp_path / "run") == before  # the failed replacement touched nothing
    train(cfg, overwrite=True)  # a replacement that loads does replace it
    assert snapshot(tmp_path / "run").keys() >= {"model/adapter_model.safetensors", MARKER}


# ----------------------------------------------------------------------------- 2. two processes


def _hold_lock(run_dir: Path):
    """Another process claiming the run dir, as a second `tunelab train` would."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from tunelab.rundir import RunDir
        run = RunDir.claim({str(run_dir)!r}, resume=True, overwrite=False)
        print("held", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    holder = _hold_lock(tmp_path / "run")
    try:
        before = snapshot(tmp_path / "run")
        for kwargs in ({}, {"overwrite": True}, {"resume": True}):  # never "use --resume" while it runs
            with pytest.raises(RunError, match=f"in use by another tunelab process \\(PID {holder.pid} "):
                train(cfg, **kwargs)
        assert snapshot(tmp_path / "run") == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock is stale and the next run takes it over
    assert f"pid={holder.pid}" in (tmp_path / "run" / LOCK).read_text()
    train(cfg, overwrite=True)
    assert f"pid={os.getpid()}" in (tmp_path / "run" / LOCK).read_text()


# ----------------------------------------------------------------------------- 14. failures never block


def test_a_failed_setup_leaves_no_run_dir_and_the_corrected_run_starts(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2)
    with pytest.raises(StrategyError):
        train({**cfg, "strategy": BAD_TARGETS})
    assert not (tmp_path / "run").exists()
    with pytest.raises(StrategyError):  # nor the folders it had to create above it
        train({**cfg, "strategy": BAD_TARGETS, "output_dir": str(tmp_path / "runs" / "new" / "x")})
    assert not (tmp_path / "runs").exists()
    # an empty directory the user made is left empty
    (tmp_path / "mine").mkdir()
    with pytest.raises(StrategyError):
        train({**cfg, "strategy": BAD_TARGETS, "output_dir": str(tmp_path / "mine")})
    assert list((tmp_path / "mine").iterdir()) == []
    assert train(cfg).summary["train"]["steps"] == 2


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_rerun(tiny_llama, memo_data, tmp_path):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("a crash in training")

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=3)
    with pytest.raises(RuntimeError, match="a crash in training"):
        train(cfg, callbacks=[Boom()])
    assert (tmp_path / "run" / "config.yaml").is_file()  # it had begun: the run dir exists
    result = train(cfg)  # no --overwrite needed: there was nothing to resume
    assert result.summary["train"]["steps"] == 3


def test_output_dir_that_is_a_file_is_refused(tiny_llama, memo_data, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    with pytest.raises(RunError, match="is a file, not a directory"):
        train(tiny_config(tiny_llama, memo_data, f, "lora", max_steps=2), overwrite=True)
    with pytest.raises(RunError, match="cannot write there"):
        train(tiny_config(tiny_llama, memo_data, f / "run", "lora", max_steps=2))
    assert f.read_text() == "keep me"


def test_a_finished_run_records_its_status(tiny_llama, memo_data, tmp_path):
    import json

    train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=2))
    marker = json.loads((tmp_path / "run" / MARKER).read_text())
    assert marker["status"] == "finished" and marker["pid"] == os.getpid() and marker["time"] <= time.time()


def test_a_signal_while_a_stopping_run_records_its_end_leaves_its_message_whole(tmp_path, monkeypatch):
    """Under torchrun the survivors of a killed worker get SIGTERM as their collective fails. One that lands
    while rank 0 records how the run ended must not replace the message (how to go on) with a bare
    KeyboardInterrupt; the CLI's SIGTERM handler is back in place afterwards."""
    import json
    import signal

    from tunelab.cli import _terminate
    from tunelab.errors import Interrupted
    from tunelab.rundir import RunDir, guarded

    run = RunDir.claim(tmp_path / "run", resume=False, overwrite=False)
    run.begin({"output_dir": str(tmp_path / "run")})
    recording = RunDir.set_status

    def set_status(self, status):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM, as rank 0 writes its marker
        recording(self, status)

    monkeypatch.setattr(RunDir, "set_status", set_status)
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            with guarded(run, save_steps=4):
                raise KeyboardInterrupt  # the first stop: Ctrl-C or an earlier SIGTERM
        except BaseException as e:  # a KeyboardInterrupt escaping would stop pytest itself
            ended = e
        assert signal.getsignal(signal.SIGTERM) is _terminate
    finally:
        signal.signal(signal.SIGTERM, before)
    assert isinstance(ended, Interrupted), repr(ended)
    assert (
        str(ended) == "interrupted; no checkpoint was written yet (training.save_steps=4); run again to start over"
    )
    assert json.loads((tmp_path / "run" / MARKER).read_text())["status"] == "interrupted"
