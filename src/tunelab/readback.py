"""Reading finished runs back: scoring, generating, merging. Each mirrors a CLI verb."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import modelcard
from tunelab.artefacts import LoadedRun, load_run
from tunelab.config import load_config
from tunelab.data import prepare_file
from tunelab.errors import RunError, first_line
from tunelab.evaluate import generate_batch, score
from tunelab.fsutil import atomic_dir
from tunelab.integrity import check_files, read_json
from tunelab.models import ModelNotFound, base_dtype, load_model, load_tokenizer, resolve_model, tunelab_home
from tunelab.modes import MODES
from tunelab.rundir import CONFIG, MODEL, SUMMARY, is_run_dir
from tunelab.runtime import bf16_supported, device, resolve_precision


def _target(target: str | Path, *, allow_pickle: bool = False) -> LoadedRun:
    """A run dir, or a model name/path (the untouched model, for baselines)."""
    if is_run_dir(Path(target)):
        return load_run(target)
    model_dir = resolve_model(str(target), allow_pickle=allow_pickle)
    return LoadedRun(
        None, load_model(model_dir, allow_pickle=allow_pickle).eval(), load_tokenizer(model_dir), None
    )


def _select_task(loaded: LoadedRun, task: str | None, target) -> Any:
    """The task config ``task`` names in a multi-task run, with the model routed to its parts; None when no
    task is given (refused when the run has per-task parts: which would answer?)."""
    names = [t.name for t in loaded.cfg.tasks] if loaded.cfg is not None and loaded.cfg.tasks else []
    if task is None:
        if loaded.stack is not None and loaded.stack.routes_tasks:
            raise RunError(f"{target} has parts per task; choose one with --task ({', '.join(names)})")
        return None
    if task not in names:
        known = f"its tasks: {', '.join(names)}" if names else "it was not trained on named tasks"
        raise RunError(f"--task {task}: {target} has no such task; {known}")
    if loaded.stack is not None:
        loaded.stack.select_task(loaded.model, task)
    return next(t for t in loaded.cfg.tasks if t.name == task)


def evaluate(
    target: str | Path,
    data: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    task: str | None = None,
) -> dict:
    """Score a run (or a bare model) on ``data`` (default: the run's eval file, or task ``task``'s in a
    multi-task run, whose own parts then answer). Mirrors ``tunelab eval``."""
    bare = None
    if not is_run_dir(Path(target)):  # a bare model: its config comes from the overrides alone
        if data is None:
            raise RunError("evaluating a bare model needs --data FILE")
        bare = load_config({"model": str(target), "data": {"train": str(data)}}, overrides)
    loaded = _target(target, allow_pickle=bare.allow_pickle if bare else False)
    cfg = bare if bare is not None else load_config(loaded.cfg.to_dict(), overrides)
    chosen = _select_task(loaded, task, target)
    data_cfg = chosen or (cfg.data if cfg.data is not None else cfg.tasks[0])
    data = data or (cfg.data.eval if cfg.data is not None else chosen.eval if chosen else None)
    if data is None:
        hint = "; pass --data FILE" + ("" if chosen or cfg.data else " or --task NAME")
        raise RunError(f"{target}: no eval file to score{hint}")
    dev = device()
    loaded.model.to(dev)
    labels = None
    if loaded.cfg is not None and (Path(target) / SUMMARY).is_file():
        # classification prompts list the training label set, recorded in the run's summary
        recorded = read_json(Path(target) / SUMMARY, what="the run's summary")
        labels = MODES[recorded["mode"]].labels(recorded, chosen.name if chosen is not None else None)
    prepared = prepare_file(data, loaded.tokenizer, data_cfg, cfg.training.max_length, labels=labels)
    bf16 = resolve_precision(cfg.training.precision, dev) == "bf16"
    classify = None
    if loaded.stack is not None:

        def classify(ids, mask):
            return loaded.stack.classify(loaded.model, ids.to(dev), mask.to(dev), bf16)

    return score(loaded.model, loaded.tokenizer, prepared, cfg.eval, bf16, classify=classify)


def generate(
    target: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    system: str | None = None,
    temperature: float = 0.0,
    task: str | None = None,
) -> str:
    """One answer to ``prompt``, rendered with the chat template when the tokenizer has one; in a multi-task
    run with parts per task, by task ``task``'s parts."""
    loaded = _target(target)
    _select_task(loaded, task, target)
    tok = loaded.tokenizer
    dev = device()
    loaded.model.to(dev)
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text, special = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    else:
        text, special = prompt, True
    kwargs = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    return generate_batch(loaded.model, tok, [(text, special)], max_new_tokens, bf16_supported(dev), **kwargs)[0]


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a run's adapter into the base weights and save a standalone safetensors model."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir} is a file; merge writes a model directory: choose a new directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"{out_dir} is not empty; choose a new directory for the merged model")
    return _write_merged(_mergeable(run_dir), run_dir, out_dir)


def _mergeable(run_dir: str | Path, *, standalone_ok: bool = False) -> LoadedRun:
    """The run, loaded, if its model can be folded into one set of weights (or, with ``standalone_ok``,
    already is one: a full fine-tune); a :class:`RunError` saying why not otherwise."""
    loaded = load_run(run_dir)
    if loaded.stack.baseline:
        raise RunError(f"{run_dir} is a prompting baseline: nothing was trained, so there is nothing to merge")
    if loaded.stack.standalone:
        if standalone_ok:
            return loaded
        raise RunError(
            f"{run_dir} used {'+'.join(loaded.cfg.strategy_names())}: its {MODEL}/ is already a "
            "standalone model, nothing to merge"
        )
    if loaded.stack.not_mergeable:
        raise RunError(
            f"{run_dir}: {', '.join(loaded.stack.not_mergeable)} cannot be folded into the weights (they add "
            "modules or virtual tokens); serve the run with its base model instead"
        )
    return loaded


def _write_merged(loaded: LoadedRun, run_dir: str | Path, out_dir: Path) -> Path:
    """The loaded run's components folded into its base weights, saved in the base model's own dtype (a
    bf16 model stays bf16, not the fp32 tunelab trains in) to ``out_dir``, absent or empty."""
    model = loaded.stack.merge(loaded.model)
    model = model.to(base_dtype(resolve_model(loaded.cfg.model, allow_pickle=loaded.cfg.allow_pickle)))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        shutil.copy(Path(run_dir) / CONFIG, tmp / "tunelab_config.yaml")
    return out_dir


def export(run_dir: str | Path, out: str | Path, fmt: str = "gguf", ftype: str = "f16") -> Path:
    """A run's model as one GGUF file (llama.cpp, Ollama): its adapter merged first where it has one
    (:func:`merge`), a full fine-tune's model as saved; ``ftype``: f32, f16, bf16 or q8_0."""
    import tempfile

    from tunelab import ggufio

    out = Path(out)
    if fmt != "gguf":
        raise RunError(f"--format {fmt}: allowed: gguf")
    if ftype not in ggufio.TYPES:
        raise RunError(f"--type {ftype}: allowed: {', '.join(ggufio.TYPES)}")
    if out.exists():
        raise RunError(f"{out} exists; export writes a new file: choose another name")
    loaded = _mergeable(run_dir, standalone_ok=True)
    if loaded.stack.standalone:
        return ggufio.export(Path(run_dir) / MODEL, out, ftype, source=run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as d:  # loaded once, merged here
        return ggufio.export(_write_merged(loaded, run_dir, Path(d) / "merged"), out, ftype, source=run_dir)


def push_files(run_dir: str | Path) -> list[str]:
    """What :func:`push` uploads: every file of the run's ``model/`` (weights, tokenizer, the model card)."""
    with staged_upload(run_dir) as folder:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


#: Text files of a model directory that may name a local path (PEFT writes the base model's path into
#: adapter_config.json); weights are linked into the staged copy unread.
_TEXT = (".json", ".md", ".yaml", ".yml", ".txt", ".jinja")
#: The tokenizer's vocabulary, copied from the base model: its tokens may well spell "/data" or "/home" and
#: name no path of this machine, so it is not searched for paths.
_VOCABULARY = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")


@contextmanager
def staged_upload(run_dir: str | Path) -> Iterator[Path]:
    """The run's ``model/`` as :func:`push` publishes it, in a temporary directory: checked like every read
    back (damaged, pickled or non-finite files refused), PEFT's ``base_model_name_or_path`` (a local path)
    replaced by the base model's public name (its hub id when one is known, else its directory's name), and
    refused if any text file still holds one of this machine's absolute paths (the run's, the base model's,
    the data's, the home directory)."""
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL
    if not (model_dir / "README.md").is_file():
        raise RunError(f"{run_dir} has no {MODEL}/ with a model card: push takes a finished run's directory")
    cfg = load_config(run_dir / CONFIG)
    check_files(model_dir, allow_pickle=cfg.allow_pickle)
    try:
        base_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    except ModelNotFound:  # the run was copied here without its base model: its name is all push needs
        base_dir = Path(cfg.model).expanduser()
    public = modelcard.base_model_name(cfg.model, base_dir)
    private = _local_paths(run_dir, base_dir, cfg)
    with tempfile.TemporaryDirectory(prefix=f".{MODEL}-push-", dir=run_dir) as d:
        folder = Path(d)
        for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            dest = folder / f.relative_to(model_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix.lower() not in _TEXT:
                _link_or_copy(f, dest)
                continue
            text = f.read_text(encoding="utf-8")
            if f.suffix == ".json" and "base_model_name_or_path" in text:
                data = json.loads(text)
                if isinstance(data, dict) and "base_model_name_or_path" in data:
                    data["base_model_name_or_path"] = public
                    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            leaked = [p for p in private if p in text] if f.name not in _VOCABULARY else []
            if leaked:
                raise RunError(
                    f"{f}: holds a local path ({leaked[0]}); tunelab does not publish this machine's paths: "
                    "remove it from the file, then push again"
                )
            dest.write_text(text, encoding="utf-8")
        yield folder


def _local_paths(run_dir: Path, base_dir: Path, cfg) -> list[str]:
    """This machine's absolute paths that a published file must not hold, longest first."""
    places = {run_dir.resolve(), base_dir.resolve(), Path.home().resolve(), tunelab_home().resolve()}
    for d in [cfg.data, *(cfg.tasks or [])]:
        for f in (getattr(d, "train", None), getattr(d, "eval", None)):
            if f:
                places |= {Path(f).resolve().parent}
    return sorted({str(p) for p in places if str(p) != p.anchor}, key=len, reverse=True)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same file system: no copy of the weights
    except OSError:
        shutil.copy2(src, dest)


def push(run_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the run's ``model/`` (as :func:`staged_upload` stages it) to the model hub repository
    ``repo_id`` (created if absent) with ``huggingface_hub``; needs the network and a token (``HF_TOKEN`` or
    ``hf auth login``). Returns its URL."""
    from huggingface_hub import HfApi, constants, get_token

    with staged_upload(run_dir) as folder:
        files = [p for p in folder.rglob("*") if p.is_file()]
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise RunError("push needs the network, and HF_HUB_OFFLINE is set: unset it to upload")
        if not get_token():
            raise RunError("push needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
        api = HfApi()
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=f"tunelab: {Path(run_dir).name} ({len(files)} files)",
            )
        except Exception as e:  # noqa: BLE001 - the hub client's errors (network, HTTP, auth) are many types
            if isinstance(e, RunError):
                raise
            raise RunError(
                f"push to {repo_id} at {constants.ENDPOINT} failed: {first_line(e)}; check the network and the "
                "token, then push again"
            ) from None
    return str(url)
