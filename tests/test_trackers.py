"""training.report_to: transformers' tracker integrations, tested with MLflow's local store."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import tiny_config
from tunelab.run import RunError, train


def test_mlflow_gets_the_runs_metrics_in_a_local_store_under_the_run(tiny_llama, memo_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")  # the test extra installs it (pyproject.toml)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=4, logging_steps=1)
    cfg["training"]["report_to"] = ["mlflow"]
    run = train(cfg).run_dir
    assert "MLFLOW_TRACKING_URI" not in os.environ  # set for the run only
    assert not (run / "tb").exists()  # tensorboard was not asked for

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logged if "loss" in x]
    history = client.get_metric_history(found.info.run_id, "loss")
    assert [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)] == [round(x, 4) for x in losses]
    assert float(found.data.params["learning_rate"]) == cfg["training"]["lr"]


def test_a_tracker_without_its_package_is_refused_before_training(tiny_llama, memo_data, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora")
    cfg["training"]["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(RunError, match=r"training.report_to: wandb needs the wandb package \(pip install wandb\)"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unknown_tracker_is_a_config_error_listing_the_allowed_ones(tiny_llama, memo_data, tmp_path):
    from tunelab.config import ConfigError, load_config

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora")
    cfg["training"]["report_to"] = ["mlfow"]
    with pytest.raises(ConfigError, match=r"training.report_to.0: .*'tensorboard', 'mlflow'"):
        load_config(cfg)
