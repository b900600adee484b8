"""Ready-made comparisons: ``tunelab compare --preset NAME``.

``guide`` runs every strategy of the guide on the default model and the demo task (support-ticket triage,
:mod:`tunelab.demo`), on one budget: prompt baselines (zero- and 4-shot), full fine-tuning, layer-wise,
bottleneck adapters, prefix and prompt tuning, LoRA, IA3, the regularizers against forgetting, multi-task
learning and continual learning (the demo task with the other built-in tasks, :mod:`tunelab.builtin_tasks`,
as extra training; the row is scored on the demo task), distillation into a smaller student, and hybrids.
Sized to finish in under an hour on 2 CPU cores (30 steps of batch 8); docs/results.md holds its figures.

A preset is an ordinary grid: it is written to ``<output_dir>/data/<preset>.yaml`` beside its generated data,
so it can be read, copied and edited like any other (``tunelab compare <output_dir>/data/guide.yaml``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tunelab.builtin_tasks import write_tasks
from tunelab.config import TrainingConfig
from tunelab.demo import INSTRUCTION
from tunelab.lab.grid import VARIANTS
from tunelab.models import resolve_model

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "lr": 1e-3}
FULL_LR = ["training.lr=5.0e-5"]
LONG = ["training.max_length=1024"]  # four examples in the prompt


def _blocks(model: str) -> int:
    config = json.loads((resolve_model(model) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config["n_layer"])


#: a searched preset's spaces: each single-strategy row's learning rate over its strategy's usual range
#: (a decade either side of the customary rate), and the prompt baseline's shots and example selection
SPACES = {
    "full": {"lr": {"log_uniform": [1.0e-5, 3.0e-4]}},
    "layerwise": {"lr": {"log_uniform": [2.0e-5, 6.0e-4]}},
    "lisa": {"lr": {"log_uniform": [2.0e-5, 6.0e-4]}},
    "adapters": {"lr": {"log_uniform": [2.0e-4, 6.0e-3]}},
    "prefix": {"lr": {"log_uniform": [1.0e-3, 3.0e-2]}},
    "prompt-tuning": {"lr": {"log_uniform": [1.0e-3, 3.0e-2]}},
    "lora": {"lr": {"log_uniform": [2.0e-4, 6.0e-3]}},
    "ia3": {"lr": {"log_uniform": [1.0e-3, 3.0e-2]}},
    "4-shot": {"shots": [1, 4], "select": ["random", "bm25"]},
}
TASKS = ("triage", "extraction", "translation", "summaries")  #: what a guide comparison may be scored on


def guide(
    out: Path,
    steps: int = 30,
    model: str = "smollm2-135m-instruct",
    seeds: int | None = None,
    search: bool = False,
    task: str = "triage",
    eval_rows: int = 40,
) -> dict[str, Any]:
    """The guide's grid on ``task`` (its data written under ``out/data``); with ``seeds``, every row once per
    seed; with ``search``, each single-strategy row's learning rate (and the few-shot row's prompt) chosen by
    successive halving on a dev split of 20 rows (:data:`SPACES`); ``eval_rows``: the rows every run is
    scored on."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the guide runs on {', '.join(TASKS)}")
    others = [t for t in ("triage", "sentiment", "extraction") if t != task][:2]
    written = {
        t["name"]: t for t in write_tasks(out / "data", train_rows=320, eval_rows=eval_rows, names=(task, *others))
    }
    # "triage" below is the comparison's own task (the demo's triage unless ``task`` says otherwise)
    triage, sentiment, extraction = written[task], written[others[0]], written[others[1]]
    if search:  # the rows a search chooses on, carved from train (auto's least: every candidate is scored on it)
        triage["dev_split"] = 20
    own = {k: v for k, v in triage.items() if k != "name"}
    first = f"seed-{TrainingConfig.model_fields['seed'].default}" if seeds else None  # the teacher's first seed
    teacher = str(out / VARIANTS / "lora" / first) if first else str(out / VARIANTS / "lora")
    # the student drops every third block: 20 of the default model's 30, 27% fewer parameters
    blocks = _blocks(model)
    student = [b for b in range(blocks) if b % 3 != 2]
    top = max(1, blocks // 3)  # layer-wise: the top third of the blocks (10 of 30)
    distill = {"name": "distill", "teacher": teacher, "alpha": 0.5, "temperature": 2.0, "top_k": 64}
    sequence = [triage, extraction]  # continual: the comparison's task first, then another; scored after both
    grid = {
        "base": {
            "model": model,
            "data": own,
            "training": {
                "max_steps": steps,
                "batch_size": 8,
                "warmup_steps": 3,
                "max_length": 192,
                "logging_steps": 2,
                "save_steps": steps,
            },
            # a one-sentence summary runs to about 25 tokens; every other task's answer fits in 24
            "eval": {"before": False, "max_new_tokens": 32 if task == "summaries" else 24, "batch_size": 20},
        },
        "variants": [
            {"name": "zero-shot", "strategy": {"name": "prompt-only"}},
            {"name": "4-shot", "strategy": {"name": "prompt-only", "shots": 4}, "set": LONG},
            {"name": "full", "strategy": "full", "set": FULL_LR},
            # the blocks the probe measurement ranks highest, as many as the top third: the choice that
            # docs/layerwise.md found best (it beat the top, bottom and evenly spaced blocks on this task);
            # measuring costs about 7 min per run on 2 AVX2 cores in fp32
            {
                "name": "layerwise",
                "strategy": {"name": "layerwise", "select": "auto", "by": "probe", "budget": top, "lr": 1e-4},
            },
            # LISA: as many blocks at a time as the layer-wise row trains, four draws over the budget
            {
                "name": "lisa",
                "strategy": {"name": "layerwise", "sample": top, "every": max(1, steps // 4), "lr": 1e-4},
            },
            {"name": "adapters", "strategy": {"name": "adapters", "placement": "houlsby"}},
            {"name": "prefix", "strategy": {"name": "prefix", "num_virtual_tokens": 20}},
            {
                "name": "prompt-tuning",
                "strategy": {"name": "prompt", "num_virtual_tokens": 20, "init": "text", "init_text": INSTRUCTION},
            },
            {"name": "lora", "strategy": LORA},
            {"name": "ia3", "strategy": {"name": "ia3"}},
            {"name": "full+l2sp", "strategy": ["full", {"name": "l2sp", "alpha": 0.05}], "set": FULL_LR},
            {"name": "full+ewc", "strategy": ["full", {"name": "ewc", "lam": 1e3, "samples": 32}], "set": FULL_LR},
            {"name": "full+retention", "strategy": ["full", {"name": "retention", "lam": 1.0}], "set": FULL_LR},
            {"name": "lora+retention", "strategy": [LORA, {"name": "retention", "lam": 1.0}]},
            {"name": "layerwise+prefix", "strategy": [{"name": "layerwise", "top": top, "lr": 1e-4}, "prefix"]},
            {"name": "prefix+lora", "strategy": ["prefix", LORA]},
            {
                "name": "multitask",
                "strategy": LORA,
                "mode": "multitask",
                "tasks": [triage, sentiment, extraction],
                "multitask": {"sampling": "uniform"},
            },
            {"name": "continual", "strategy": LORA, "mode": "continual", "tasks": sequence},
            {
                "name": "continual+replay",
                "strategy": [LORA, {"name": "replay", "share": 0.2}],
                "mode": "continual",
                "tasks": sequence,
            },
            {
                "name": "distilled-student",
                "strategy": ["full", {"name": "student", "keep_layers": student}, distill],
                "set": ["training.lr=1.0e-4"],
            },
            {"name": "adapters+distill", "strategy": [{"name": "adapters", "placement": "houlsby"}, distill]},
        ],
        "baseline": False,  # the zero-shot and 4-shot rows are the baselines
        "output_dir": str(out),
        "report": {"within": 5},
    }
    if seeds:
        grid["seeds"] = seeds
    if search:
        # the first cut after a third of the budget, past the warmup, scored after a short cool-down: early
        # cuts favour low rates (docs/search.md, "the short-horizon bias")
        grid["search"] = {"eta": 3, "candidates": 4, "min_steps": max(2, steps // 3), "cooldown": 0.33}
        for v in grid["variants"]:
            if v["name"] in SPACES:
                v["search"] = SPACES[v["name"]]
    return grid


PRESETS = {"guide": guide}


def write_preset(name: str, out: Path, steps: int | None = None, model: str | None = None, **options) -> Path:
    """Write preset ``name``'s data and grid under ``out/data``; returns the grid file. ``options``: the
    preset's own (guide: ``seeds``, ``search``, ``task``, ``eval_rows``)."""
    given = {"steps": steps, "model": model, **options}
    grid = PRESETS[name](out, **{k: v for k, v in given.items() if v is not None})
    path = out / "data" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False, width=110))
    return path
