"""``tunelab layers CONFIG``, and the measurement a run takes for ``layerwise: {select: auto}``: the config's
model measured for its task (tunelab.strategies.importance: the estimators, the dev split, the choice),
written as ``layers.json`` with a bar chart, ``layers.png`` (blocks × estimator)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunelab.strategies import ESTIMATORS, LayerScores, MeasureSettings, measure_blocks

LAYERS, CHART = "layers.json", "layers.png"  #: what a measurement writes (a run: RUN/layers.json)


def measure_run(cfg, model, tokenizer, model_dir: Path, bf16: bool, estimators, say=None) -> LayerScores:
    """Measure ``model`` (untouched) for the config's task: its first data (``data``, else the first of
    ``tasks``), training rows and dev rows as the module docstring says, drawn with ``training.seed``."""
    from tunelab.data import DataError, prepare_splits

    data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
    t = cfg.training
    if getattr(data_cfg, "dev", None) or getattr(data_cfg, "dev_split", None):
        train, dev = prepare_splits(data_cfg, tokenizer, t.max_length, t.seed, score_on="dev")
    else:  # carved after eval_split's rows: auto, or a quarter of a file too small for auto's 20 rows
        try:
            auto = data_cfg.model_copy(update={"dev_split": "auto"})
            train, dev = prepare_splits(auto, tokenizer, t.max_length, t.seed, score_on="dev")
        except DataError as e:
            if "dev_split auto takes" not in str(e):
                raise
            quarter = data_cfg.model_copy(update={"dev_split": 0.25})
            train, dev = prepare_splits(quarter, tokenizer, t.max_length, t.seed, score_on="dev")
    settings = MeasureSettings(estimators=tuple(estimators), seed=t.seed)
    key = run_key(cfg, model_dir, settings)
    return measure_blocks(model, train.features, dev.features, tokenizer.pad_token_id, settings, bf16, key, say)


def run_key(cfg, model_dir: Path, settings: MeasureSettings) -> dict[str, Any]:
    """What a measurement depends on; a run reads back its own RUN/layers.json only when this is unchanged."""
    data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
    return json.loads(
        json.dumps(
            {
                "model": str(model_dir),
                "data": data_cfg.model_dump(mode="json"),
                "max_length": cfg.training.max_length,
                "precision": cfg.training.precision,
                "settings": asdict(settings),
            }
        )
    )


def measure_layers(
    config, overrides: list[str] | None = None, out: str | Path = ".", estimators=ESTIMATORS
) -> tuple[LayerScores, Path]:
    """``tunelab layers CONFIG``: measure the config's model for its task with ``estimators``, and write
    ``layers.json`` and ``layers.png`` into ``out``. Returns the scores and the JSON's path."""
    from tunelab.config import RunConfig, load_config
    from tunelab.errors import RunError
    from tunelab.models import load_model, load_tokenizer, resolve_model
    from tunelab.progress import status
    from tunelab.runtime import device, resolve_precision

    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise RunError(f"estimator(s) {bad or '(none)'}: allowed {', '.join(ESTIMATORS)}")
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    out = Path(out)
    json_path, png_path = out / LAYERS, out / CHART
    taken = [p for p in (json_path, png_path) if p.exists()]
    if taken and not _ours(json_path):  # never replace a file tunelab did not write
        raise RunError(f"{taken[0]} exists and is not a tunelab measurement; give another --out")
    model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(model_dir)
    dev = device()
    bf16 = resolve_precision(cfg.training.precision, dev) == "bf16"
    model = load_model(model_dir, allow_pickle=cfg.allow_pickle).to(dev)
    scores = measure_run(cfg, model, tokenizer, model_dir, bf16, tuple(estimators), status)
    out.mkdir(parents=True, exist_ok=True)
    scores.save(json_path)
    chart(scores, png_path)
    return scores, json_path


def _ours(path: Path) -> bool:
    try:
        LayerScores.load(path)
        return True
    except (OSError, ValueError, TypeError):
        return False


# ----------------------------------------------------------------------------- the chart


def chart(scores: LayerScores, path: Path) -> None:
    """Bars per block, one colour per estimator, each estimator scaled to its largest score (``layers.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.fsutil import write_bytes_atomic
    from tunelab.lab.plots import _png

    have = [e for e in ESTIMATORS if e in scores.scores]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * scores.n_blocks * len(have)), 3.8))
    width = 0.8 / max(len(have), 1)
    for j, e in enumerate(have):
        vals = scores.scores[e]["block"]
        top = max((abs(v) for v in vals), default=0) or 1.0
        xs = [i + (j - (len(have) - 1) / 2) * width for i in range(scores.n_blocks)]
        ax.bar(xs, [v / top for v in vals], width=width, label=e)
    ax.set_xlabel("block")
    ax.set_ylabel("score / largest score")
    ax.set_title("How much each block matters for this task")
    ax.set_xticks(range(scores.n_blocks))
    ax.tick_params(axis="x", labelsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.legend(fontsize=8)
    write_bytes_atomic(path, _png(fig))
