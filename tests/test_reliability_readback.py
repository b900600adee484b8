"""What is read back is checked as strictly as what is trained (issue 19): every verb that loads a run
(eval, generate, merge, export, push, a teacher) against the same damaged run dirs, each refusal one line
naming the file, exit 2; a damaged checkpoint is skipped on resume; a damaged GGUF, a refused chat template,
an unfinished run, a missing task file and a network failure in push each say what they are."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import MEMO_ROWS, crash_at, tiny_config, write_jsonl
from tunelab.cli import main
from tunelab.run import train


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A finished LoRA run and a finished full fine-tune, each copied (never changed) by the damage below."""
    d = tmp_path_factory.mktemp("readback")
    data = write_jsonl(d / "memo.jsonl", MEMO_ROWS * 4)
    return {s: train(tiny_config(tiny_llama, data, d / s, s, max_steps=2)).run_dir for s in ("lora", "full")}


def _nan_in(f: Path) -> None:
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, f)


def _cut(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _pickled(f: Path) -> None:
    torch.save(load_file(f), f.with_suffix(".bin"))
    f.unlink()


#: damage -> (run it applies to, file under model/, what it does, the words of the refusal)
DAMAGE = {
    "NaN adapter": ("lora", "adapter_model.safetensors", _nan_in, "holds non-finite values"),
    "NaN full model": ("full", "model.safetensors", _nan_in, "holds non-finite values"),
    "truncated adapter": ("lora", "adapter_model.safetensors", _cut, "truncated"),
    "pickled adapter": ("lora", "adapter_model.safetensors", _pickled, "pickled weights"),
    "truncated adapter_config.json": ("lora", "adapter_config.json", _cut, "not valid JSON"),
}


def damaged(runs, name, tmp_path) -> tuple[Path, Path]:
    """A copy of the run with the damage done; the run dir and the file a refusal must name."""
    which, file, harm, _ = DAMAGE[name]
    run = Path(shutil.copytree(runs[which], tmp_path / f"{which}-damaged"))
    harm(run / "model" / file)
    named = run / "model" / (Path(file).with_suffix(".bin").name if harm is _pickled else file)
    return run, named


def verb_args(verb: str, run: Path, tmp_path: Path) -> list[str]:
    if verb == "teacher":  # a run that distils the damaged run into a student
        data = write_jsonl(tmp_path / "memo.jsonl", MEMO_ROWS * 4)
        student = ["lora", {"name": "distill", "teacher": str(run)}]
        cfg = tiny_config(
            yaml.safe_load((run / "config.yaml").read_text())["model"], data, tmp_path / "s", student
        )
        (tmp_path / "student.yaml").write_text(yaml.safe_dump(cfg))
        return ["train", str(tmp_path / "student.yaml")]
    return {
        "eval": ["eval", str(run)],
        "generate": ["generate", str(run), "hello"],
        "merge": ["merge", str(run), str(tmp_path / "merged")],
        "export": ["export", str(run), str(tmp_path / "out.gguf")],
        "push": ["push", str(run), "someone/model"],
    }[verb]


VERBS = ["eval", "generate", "merge", "export", "push", "teacher"]
# a full fine-tune has nothing to merge: merge refuses it for that reason first, damaged or not
CASES = [(v, d) for d in DAMAGE for v in VERBS if not (v == "merge" and DAMAGE[d][0] == "full")]


@pytest.mark.parametrize("verb, name", CASES)
def test_every_verb_refuses_a_damaged_run_in_one_line_naming_the_file(verb, name, runs, tmp_path, capsys):
    run, named = damaged(runs, name, tmp_path)
    capsys.readouterr()
    args = verb_args(verb, run, tmp_path)
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    whose = f"distill.teacher {run}: " if verb == "teacher" else ""  # a teacher's file is named as the teacher's
    assert err.startswith(f"tunelab {args[0]}: error: {whose}{named}: ") and DAMAGE[name][3] in err, err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("*.gguf"))  # nothing written
    assert not (tmp_path / "s").exists()


def test_a_missing_teacher_and_a_missing_task_file_are_named_as_such(tiny_llama, memo_data, tmp_path):
    from tunelab.data import DataError
    from tunelab.strategies import StrategyError

    cfg = tiny_config(
        tiny_llama, memo_data, tmp_path / "a", ["lora", {"name": "distill", "teacher": "/no/teacher"}]
    )
    with pytest.raises(StrategyError, match=r"^distill.teacher /no/teacher: model '/no/teacher' is neither"):
        train(cfg)
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "b")
    del cfg["data"]
    cfg["tasks"] = [
        {"name": "first", "train": str(memo_data), "eval": str(memo_data)},
        {"name": "second", "train": str(tmp_path / "gone.jsonl"), "eval": str(memo_data)},
    ]
    for mode in ("continual", "multitask"):
        with pytest.raises(DataError, match=r"^task second: data file not found: .*gone.jsonl"):
            train({**cfg, "mode": mode})


def test_resume_skips_a_checkpoint_holding_nan_and_says_so(tiny_llama, memo_data, tmp_path, capsys):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=6, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[crash_at(5)])
    _nan_in(tmp_path / "run" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    resumed = train(cfg, resume=True)
    assert resumed.summary["train"]["resumed_from"] == "checkpoint-2"
    (skipped,) = resumed.summary["train"]["skipped_checkpoints"]
    assert skipped.startswith("checkpoint-4: adapter_model.safetensors: tensor ") and "non-finite" in skipped
    assert "resume: skipping checkpoint-4 (adapter_model.safetensors: tensor" in capsys.readouterr().out


def test_a_base_models_pickle_under_allow_pickle_that_the_safe_reader_refuses_is_one_line(tiny_llama, tmp_path):
    import pickle

    from tunelab.models import ModelError, load_model

    m = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    (m / "model.safetensors").unlink()

    class Exploit:  # unpickling this would run os.system
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(ModelError, match=f"^{m}: the model could not be loaded"):
        load_model(m, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_gguf_is_refused_naming_the_file(runs, tmp_path):
    from tunelab.models import ModelError, resolve_model
    from tunelab.run import export

    gguf = export(runs["lora"], tmp_path / "m.gguf", ftype="f32")
    head = tmp_path / "head.gguf"
    head.write_bytes(gguf.read_bytes()[:4096])  # the header and part of the tensor table
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size - 1000])  # the last tensor's data cut off
    for f in (head, cut):
        with pytest.raises(ModelError, match=f"^{f}: (unreadable|truncated)"):
            resolve_model(str(f))


def test_a_chat_template_the_sandbox_refuses_is_one_line_at_load(runs, tmp_path, capsys):
    run = Path(shutil.copytree(runs["lora"], tmp_path / "run"))
    (run / "model" / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert main(["generate", str(run), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused by the template sandbox" in err and str(run / "model") in err


def test_an_unfinished_run_is_named_as_one_whatever_it_still_holds(tiny_llama, memo_data, tmp_path, capsys):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=6, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[crash_at(3)])
    run = tmp_path / "run"
    for f in [*run.iterdir()]:  # keep only checkpoints/, as a partial copy would
        if f.name != "checkpoints":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    for verb in (["eval", str(run)], ["generate", str(run), "hi"], ["merge", str(run), str(tmp_path / "m")]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert "has no model/: the run did not finish (its last checkpoint is checkpoint-2); continue it" in err
        assert f"tunelab train CONFIG (with output_dir: {run}) --resume" in err and "needs --data" not in err


def test_push_names_a_network_failure_in_one_line(runs, monkeypatch, capsys):
    with socket.socket() as s:  # a port on this machine that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    assert main(["push", str(runs["lora"]), "someone/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"tunelab push: error: push to someone/model at http://127.0.0.1:{port} failed: ")


def test_nothing_push_uploads_holds_a_local_path(runs, tiny_llama, memo_data):
    from tunelab.readback import staged_upload

    for run in runs.values():
        own = {
            str(run.resolve()),
            str(Path(tiny_llama).resolve()),
            str(memo_data.parent.resolve()),
            str(Path.home()),
        }
        own |= {str(Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["train"]).parent)}
        with staged_upload(run) as folder:
            uploaded = sorted(p for p in folder.rglob("*") if p.is_file())
            assert {p.name for p in uploaded} >= {"README.md", "tokenizer.json"}
            for f in uploaded:
                text = f.read_bytes().decode("utf-8", errors="replace")
                assert not [p for p in own if p in text], f.name
            card = (folder / "README.md").read_text()
            assert "base_model_path" not in card and "pypi.org" not in card and "http" not in card
            assert f"base_model_name: {Path(tiny_llama).name}" in card
            if (folder / "adapter_config.json").is_file():
                cfg = json.loads((folder / "adapter_config.json").read_text())
                assert cfg["base_model_name_or_path"] == Path(tiny_llama).name
        assert not list(run.glob(".model-push-*"))  # the staged copy is gone


def test_push_refuses_a_local_path_it_finds_in_a_file(runs, tmp_path):
    from tunelab.errors import RunError
    from tunelab.readback import staged_upload

    run = Path(shutil.copytree(runs["lora"], tmp_path / "run"))
    (run / "model" / "notes.txt").write_text(f"trained in {run.resolve()}/checkpoints\n")
    with pytest.raises(RunError, match=r"notes.txt: holds a local path"), staged_upload(run):
        pass
