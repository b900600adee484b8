"""Experiment trackers (``training.report_to``): transformers' own integrations, checked before training and
given a sensible local default (MLflow into ``RUN/mlruns``) where the user set none."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import RunError

#: the package each tracker needs (what transformers' ``is_<tracker>_available`` looks for)
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "neptune": "neptune",
    "trackio": "trackio",
    "swanlab": "swanlab",
    "codecarbon": "codecarbon",
    "azure_ml": "azureml",
    "dagshub": "dagshub",
    "flyte": "flytekit",
    "kubeflow": "kubeflow",
}


def tracker_env(report_to: list[str], run_dir: Path) -> dict[str, str]:
    """Checks each tracker's package is installed (a :class:`RunError` naming the missing ones otherwise,
    before anything trains); returns the environment the trackers train under: MLflow without
    ``MLFLOW_TRACKING_URI`` logs into ``RUN/mlruns`` (a local file store) rather than wherever the process
    happens to run."""
    missing = [x for x in report_to if importlib.util.find_spec(TRACKER_PACKAGES[x]) is None]
    if missing:
        raise RunError(
            f"training.report_to: {', '.join(missing)} needs "
            + ", ".join(f"the {TRACKER_PACKAGES[x]} package" for x in missing)
            + f" (pip install {' '.join(TRACKER_PACKAGES[x] for x in missing)}), or leave "
            + ("it" if len(missing) == 1 else "them")
            + " out of the list"
        )
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow 3 refuses its file store unless asked: this default is a local one, beside the run's files
        return {"MLFLOW_TRACKING_URI": (run_dir / "mlruns").resolve().as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    return {}


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` set while the body runs, the process's own environment again after it."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
