"""The model card every run writes beside its weights (``RUN/model/README.md``): YAML front matter a model
hub reads (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``) plus tunelab's own record under
``tunelab:`` (strategy, data files, scores before and after, forgetting, training figures), then the same
in prose and tables, and how to load it. Written from ``summary.json`` and the resolved config, so the card
never says anything the run did not measure."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tunelab.evaluate import fmt
from tunelab.models import KNOWN_MODELS
from tunelab.rundir import CONFIG, MANIFEST, MODEL
from tunelab.summary import Summary, numbers

CARD = "README.md"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def base_model_id(model: str, model_dir: Path) -> str | None:
    """The hub id of the base model when it is known: a converted known model's source, or a local model
    whose config names one (``_name_or_path``); None for a model known only by its path."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model].hub_id
    try:
        name = json.loads((Path(model_dir) / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() else None


def base_model_name(model: str, model_dir: Path) -> str:
    """The base model as a published file may name it: its hub id when one is known, else its directory's
    name alone (never the local path)."""
    return base_model_id(model, model_dir) or Path(model_dir).name or str(model)


def render(summary: dict[str, Any], cfg: dict[str, Any], model_dir: Path) -> str:
    """The card's text for a run with this summary and resolved config; ``model_dir`` is the run's model/."""
    kind, tasks = _artefact(model_dir)
    strategies = summary["strategy"]
    data = cfg.get("data") or {}
    files = {k: Path(v).name for k, v in data.items() if k in ("train", "eval") and isinstance(v, str)}
    for t in cfg.get("tasks") or []:
        files[f"train ({t.get('name')})"] = Path(t["train"]).name
    train = summary.get("train")
    train = train[-1] if isinstance(train, list) else train
    record: dict[str, Any] = {
        "strategy": strategies,
        "mode": summary["mode"],
        "base_model_name": base_model_name(cfg.get("model", ""), Path(summary["model"])),
        "data": files,
        "parameters": {k: summary["parameters"][k] for k in ("trainable", "total")},
    }
    if summary.get("eval_before") is not None:
        record["eval_before"] = numbers(summary["eval_before"])
    if summary.get("eval") is not None:
        record["eval"] = numbers(summary["eval"])
    forgetting = {k: numbers(v) for k, v in (summary.get("forgetting") or {}).items() if isinstance(v, dict)}
    if any(forgetting.values()):
        record["forgetting"] = forgetting  # before / after / delta, each measure on the retention set
    if train:
        record["training"] = {
            k: train[k] for k in ("steps", "epochs", "tokens_seen", "tokens_per_s", "train_time_s") if k in train
        }
    record["peak_memory_mb"] = summary["memory"]["peak_mb"]
    meta: dict[str, Any] = {}
    base = base_model_id(cfg.get("model", ""), Path(summary["model"]))
    if base:
        meta["base_model"] = base
    if kind in LIBRARY:
        meta["library_name"] = LIBRARY[kind]
    meta |= {
        "pipeline_tag": "text-generation",
        "tags": ["tunelab", *strategies],
        "tunelab": record,
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    title = f"# {' + '.join(strategies)} fine-tune of {record['base_model_name']}"
    lines = [f"---\n{front}---", "", title]
    lines += [
        "",
        f"Trained with tunelab ({summary['mode']} mode, "
        f"{summary['precision']}, {summary['device']}). Training data: "
        + (", ".join(f"`{v}` ({k})" for k, v in files.items()) or "see `tunelab_config.yaml`")
        + ".",
    ]
    scores = Summary.model_validate(summary).headline()  # the mode's own section says what its scores are
    if scores:
        lines += ["", "## Scores", "", "| metric | before | after |", "|---|---:|---:|"]
        lines += [f"| {k} | {fmt(before)} | {fmt(after)} |" for k, before, after in scores]
    if record.get("forgetting"):
        f = record["forgetting"]
        lines += ["", "## Forgetting (against the untouched base model, on general prompts)", ""]
        lines += ["| measure | before | after | change |", "|---|---:|---:|---:|"]
        was, now, change = f.get("before", {}), f.get("after", {}), f.get("delta", {})
        measures = [k for k in now if k != "prompts"]
        lines += [f"| {k} | {fmt(was.get(k))} | {fmt(now[k])} | {fmt(change.get(k))} |" for k in measures]
    lines += ["", "## Training", "", "| | |", "|---|---:|"]
    p = record["parameters"]
    lines += [f"| trainable parameters | {p['trainable']:,} of {p['total']:,} |"]
    lines += [f"| {k.replace('_', ' ')} | {fmt(v)} |" for k, v in record.get("training", {}).items()]
    lines += [f"| peak memory MB | {fmt(record['peak_memory_mb'])} |"]
    lines += ["", "## Use", "", "```python", _loading(kind, tasks, cfg.get("model", "")), "```", ""]
    return "\n".join(lines)


#: The library that loads each kind of artefact on its own (the others need tunelab: ``tunelab.load_artefact``).
LIBRARY = {"model": "transformers", "peft": "peft"}


def _artefact(model_dir: Path) -> tuple[str, list[str]]:
    """The artefact's kind and tasks, from its manifest (an artefact written before manifests: by its files)."""
    try:
        info = json.loads((model_dir / MANIFEST).read_text())
        return info["kind"], list(info.get("tasks") or [])
    except (OSError, ValueError, KeyError):
        return ("peft" if (model_dir / "adapter_config.json").is_file() else "model"), []


def _loading(kind: str, tasks: list[str], model: str) -> str:
    """The code that loads this kind of artefact from the directory ``PATH`` (the card's snippet)."""
    if kind == "model":
        return (
            "from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
        )
    if kind == "peft":
        return (
            "from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
        )
    args = ["PATH"]
    if model not in KNOWN_MODELS:  # BASE: where the base model is on the machine that loads it
        args.append("base=BASE")
    if tasks:
        args.append(f"task={tasks[0]!r}")
    lines = [
        "import tunelab  # pip install tunelab: these parts go back on the base model with tunelab's own code",
        "",
        f"run = tunelab.load_artefact({', '.join(args)})",
        "model, tokenizer = run.model, run.tokenizer",
    ]
    if model not in KNOWN_MODELS:
        lines.insert(2, "BASE = 'the base model named above: a local directory, or a model tunelab knows'")
    if tasks:
        lines.append(f"# one set of parts per task: task= is one of {', '.join(tasks)}")
    return "\n".join(lines)


def write_run(run_dir: Path, summary: dict[str, Any]) -> None:
    """The card of a finished run, beside its weights (a run without a model dir, a baseline's, has none)."""
    if (run_dir / MODEL).is_dir() and (run_dir / CONFIG).is_file():
        write(summary, yaml.safe_load((run_dir / CONFIG).read_text()), run_dir / MODEL)


def write(summary: dict[str, Any], cfg: dict[str, Any], model_dir: Path) -> None:
    """Write the card into ``model_dir`` (a file of the run's own; replaced whole, never half-written)."""
    tmp = model_dir / f".{CARD}.tmp"
    tmp.write_text(render(summary, cfg, model_dir))
    tmp.replace(model_dir / CARD)
