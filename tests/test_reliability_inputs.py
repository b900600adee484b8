"""Reliability (issue 7), inputs: models that do not fit their config, stale references, empty completions,
text that must stay text, remote code, files outside the model dir, pickles, adversarial rows, and every
user error as one clear line with exit code 2.

Each test failed on the main branch before this change (docs/reliability.md)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import tunelab
from conftest import MEMO_ROWS, build_tokenizer, tiny_config, write_jsonl
from tunelab.config import DataConfig
from tunelab.data import DataError, prepare_file, read_rows
from tunelab.errors import ModelError
from tunelab.models import load_model, load_tokenizer, resolve_model

SRC = Path(tunelab.__file__).parent  # the package under test


def tunelab(*args, cwd=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load(model_dir: Path, **kw):
    return load_model(resolve_model(str(model_dir), **kw), **kw)


# ----------------------------------------------------------------------------- 5. weights that fit


def test_weights_that_do_not_match_the_config_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    mixed = copy_model(tiny_llama, tmp_path / "mixed")
    shutil.copy(tiny_gpt2 / "model.safetensors", mixed / "model.safetensors")  # GPT-2 weights, Llama config
    with pytest.raises(
        ModelError,
        match=r"do not match config.json \(llama\): 21 missing \(e.g. .*embed_tokens.weight.*\); 28 unexpected",
    ):
        load(mixed)
    load(tiny_llama)  # tied lm_head/embeddings are not reported missing


def test_non_finite_base_weights_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_model(tiny_llama, tmp_path / "nan")
    w = load_file(bad / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.norm.weight holds non-finite values"):
        load(bad)


# ----------------------------------------------------------------------------- 6. references keyed on weights


def test_retention_references_follow_the_weights_not_the_path(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from tunelab.config import ForgettingConfig
    from tunelab.forgetting import build_retention_set

    model_dir = copy_model(tiny_llama, tmp_path / "m")
    home, tok = tmp_path / "home", load_tokenizer(model_dir)
    fcfg = ForgettingConfig(max_new_tokens=4)

    def answers():
        ret = build_retention_set(load(model_dir), tok, model_dir, DataConfig(train="x"), fcfg, 64, False, home)
        return ret.references

    first = answers()
    # change the weights in place: same path, same size, same mtime
    f = model_dir / "model.safetensors"
    st = f.stat()
    w = load_file(f)
    w = {k: torch.flip(v, dims=[0]) if v.dim() == 2 else v for k, v in w.items()}
    save_file(w, f, metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    second = answers()
    assert len(list((home / "retention").glob("*.json"))) == 2  # a new reference set, not the cached one
    assert second != first


# ----------------------------------------------------------------------------- 7. empty completions


@pytest.mark.parametrize(
    "row, says",
    [
        ({"prompt": "what is the sky ?", "completion": ""}, "field 'completion' is empty"),
        ({"prompt": "what is the sky ?", "completion": "  \n "}, "field 'completion' is empty"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "messages\\[1\\] is an empty assistant message",
        ),
        ({"text": "   "}, "field 'text' is empty"),
    ],
)
def test_empty_completions_are_refused_or_skipped_and_counted(row, says, tmp_path):
    good = MEMO_ROWS[0] if "prompt" in row else row
    if "messages" in row:
        good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    elif "text" in row:
        good = {"text": "the cat sat on the mat"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good])
    tok = build_tokenizer()
    with pytest.raises(DataError, match=f"d.jsonl:2: {says}"):
        prepare_file(path, tok, DataConfig(train=str(path)), 64)
    prepared = prepare_file(path, tok, DataConfig(train=str(path), skip_bad_rows=True), 64)
    assert prepared.stats.as_dict()["skipped"] == 1 and prepared.stats.used == 2


# ----------------------------------------------------------------------------- 7b. text stays text

TRICKY = ["2021-03-04", "007", "NA", "N/A", "null", "None", "true", "1e5", "", "nan", "12:30"]


def test_jsonl_text_reaches_training_as_written(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": v or "x"} for i, v in enumerate(TRICKY)]
    dates = [{"prompt": f"when {i} ?", "completion": f"2021-03-0{i + 1}"} for i in range(4)]  # every one a date
    for name, data in (("mixed", rows), ("dates", dates)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", data)
        assert read_rows(path) == data
        prepared = prepare_file(path, build_tokenizer(), DataConfig(train=str(path), template="plain"), 64)
        assert prepared.references == [r["completion"] for r in data]


def test_csv_cells_reach_training_as_written(tmp_path):
    path = tmp_path / "d.csv"
    lines = ["prompt,completion"] + [f"q{i},{v}" for i, v in enumerate(TRICKY) if v]
    path.write_text("\n".join(lines) + "\n")
    rows = read_rows(path)
    assert [r["completion"] for r in rows] == [v for v in TRICKY if v]
    assert all(isinstance(r["prompt"], str) for r in rows)
    prepared = prepare_file(path, build_tokenizer(), DataConfig(train=str(path), template="plain"), 64)
    assert prepared.references == [v for v in TRICKY if v]
    # a quoted cell spanning lines keeps its newline, and the next row's line number is right
    path.write_text('prompt,completion\n"two\nlines",a\nq,\n')
    with pytest.raises(DataError, match=r"d.csv:4: field 'completion' is empty"):
        prepare_file(path, build_tokenizer(), DataConfig(train=str(path)), 64)


# ----------------------------------------------------------------------------- 10. no remote code


def test_a_model_that_needs_its_own_code_is_refused_and_the_code_never_runs(tiny_llama, tmp_path):
    evil = copy_model(tiny_llama, tmp_path / "evil")
    ran = tmp_path / "code-ran"
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "configuration_evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    p = tunelab("eval", str(evil), "--data", str(write_jsonl(tmp_path / "d.jsonl", MEMO_ROWS)))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"tunelab eval: error: {evil}")
    assert not ran.exists()


def test_every_transformers_load_passes_trust_remote_code_false():
    """from_pretrained / from_config calls in tunelab all say trust_remote_code=False (PEFT's own adapter
    loader has no such option: it loads weights into a model tunelab built)."""
    calls = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("from_pretrained", "from_config"):
                    owner = ast.unparse(node.func.value)
                    if owner == "PeftModel":
                        continue
                    ok = any(
                        k.arg == "trust_remote_code"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is False
                        for k in node.keywords
                    )
                    calls.append((f"{f.name}:{node.lineno} {owner}", ok))
    assert len(calls) >= 5
    assert [c for c, ok in calls if not ok] == []


# ----------------------------------------------------------------------------- 11. files stay inside


@pytest.mark.parametrize("ref", ["../elsewhere/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_index_pointing_outside_the_model_dir_is_refused(ref, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    (m / "model.safetensors").rename(tmp_path / "elsewhere" / "model.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "elsewhere" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = "pytorch_model.bin.index.json" if ref == "/etc/passwd" else "model.safetensors.index.json"
    (m / index).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, ref)}))
    with pytest.raises(ModelError, match="outside the model directory; refusing to read it"):
        load(m)


def test_pickled_weights_need_an_explicit_opt_in(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    m = copy_model(tiny_llama, tmp_path / "m")
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    with pytest.raises(
        ModelError, match="only pickled weights .*unpickling a file can run code.*allow_pickle: true"
    ):
        load(m)
    model = load(m, allow_pickle=True)
    assert sum(p.numel() for p in model.parameters()) > 0
    data = str(write_jsonl(tmp_path / "d.jsonl", MEMO_ROWS))  # a bare-model baseline takes it from --set
    p = tunelab("eval", str(m), "--data", data)
    assert p.returncode == 2 and "allow_pickle: true" in p.stderr.strip().splitlines()[-1]
    p = tunelab("eval", str(m), "--data", data, "--set", "allow_pickle=true", "--set", "eval.max_new_tokens=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loss" in json.loads(p.stdout)


# ----------------------------------------------------------------------------- 12. adversarial rows


def test_a_huge_row_costs_no_more_than_max_length(tmp_path):
    """A 30 MB row: tokenizing all of it with offsets took ~6 GB; bounded by max_length it stays small."""
    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"prompt": "classify", "completion": "the cat sat on the mat " * 1_300_000}) + "\n")
        f.write(json.dumps(MEMO_ROWS[0]) + "\n")
    code = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import build_tokenizer
        from tunelab.config import DataConfig
        from tunelab.data import prepare_file
        tok = build_tokenizer()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        p = prepare_file({str(path)!r}, tok, DataConfig(train="x", template="plain"), 128)
        assert [f["length"] for f in p.features] == [128, p.features[1]["length"]], p.features[0]["length"]
        full = tok("classify" + "the cat sat on the mat " * 100)["input_ids"][:128]
        assert p.features[0]["input_ids"] == full
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) < 600  # MB of extra peak memory for a 30 MB row


# ----------------------------------------------------------------------------- 13. one clear line


def _case_setup(name: str, tiny_llama: Path, tiny_gpt2: Path, memo: Path, tmp: Path) -> tuple[list[str], str]:
    """(CLI arguments, what the one error line must say) for each user error of issue 7 item 13."""
    cfg = tiny_config(tiny_llama, memo, tmp / "run", "lora", max_steps=2)
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    if name == "output_dir is a file":
        (tmp / "file").write_text("x")
        return ["train", str(cfg_path), "--set", f"output_dir={tmp / 'file'}"], "is a file, not a directory"
    if name == "output_dir not writable":
        return ["train", str(cfg_path), "--set", f"output_dir={tmp / 'cfg.yaml' / 'run'}"], "cannot write there"
    if name == "non-UTF-8 data":
        bad = tmp / "latin1.jsonl"
        bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "caf\xe9", "completion": "b"}\n')
        return ["train", str(cfg_path), "--set", f"data.train={bad}"], f"{bad}:3: not UTF-8 text (byte 0xe9"
    if name == "truncated safetensors":
        m = copy_model(tiny_llama, tmp / "m")
        w = m / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
        return ["train", str(cfg_path), "--set", f"model={m}"], f"{w}: truncated"
    if name == "invalid config.json":
        m = copy_model(tiny_llama, tmp / "m")
        (m / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
        return ["eval", str(m), "--data", str(memo)], f"{m / 'config.json'}:2: not valid JSON"
    if name == "no tokenizer files":
        m = copy_model(tiny_llama, tmp / "m")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (m / f).unlink(missing_ok=True)
        return ["train", str(cfg_path), "--set", f"model={m}"], "no tokenizer files"
    if name == "weights of another architecture":
        m = copy_model(tiny_llama, tmp / "m")
        shutil.copy(tiny_gpt2 / "model.safetensors", m / "model.safetensors")
        return ["train", str(cfg_path), "--set", f"model={m}"], "the weights do not match config.json"
    if name == "merge into a file":
        (tmp / "out.bin").write_text("x")
        return ["merge", str(tmp / "run"), str(tmp / "out.bin")], "is a file; merge writes a model directory"
    if name == "run dir with checkpoints only":
        cfg["training"].update(max_steps=4, save_steps=2)
        cfg_path.write_text(yaml.safe_dump(cfg))
        from transformers import TrainerCallback

        from tunelab.run import train

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 3:
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(cfg, callbacks=[Stop()])
        return [
            "eval",
            str(tmp / "run"),
        ], "has no model/: the run did not finish (its last checkpoint is checkpoint-2)"
    if name == "forgetting file without its column":
        f = write_jsonl(tmp / "general.jsonl", [{"question": "what is the sky ?"}])
        return [
            "train",
            str(cfg_path),
            "--set",
            f"forgetting.file={f}",
        ], "needs a 'prompt' column (it has: question)"
    if name == "duplicate YAML key":
        cfg_path.write_text(cfg_path.read_text() + "training:\n  max_steps: 5\n")
        return ["validate", str(cfg_path)], "key 'training' appears twice (first at line"
    if name == "boolean for a number":
        return [
            "validate",
            str(cfg_path),
            "--set",
            "training.batch_size=true",
        ], "training.batch_size: expected a number"
    if name == "--set into a list":
        return [
            "validate",
            str(cfg_path),
            "--set",
            "strategy.3.r=4",
        ], "reach an item by index (strategy.0.KEY=VALUE)"
    raise AssertionError(name)


CASES = [
    "output_dir is a file",
    "output_dir not writable",
    "non-UTF-8 data",
    "truncated safetensors",
    "invalid config.json",
    "no tokenizer files",
    "weights of another architecture",
    "merge into a file",
    "run dir with checkpoints only",
    "forgetting file without its column",
    "duplicate YAML key",
    "boolean for a number",
    "--set into a list",
]


@pytest.mark.parametrize("name", CASES)
def test_a_user_error_is_one_clear_line_with_exit_code_2(name, tiny_llama, tiny_gpt2, memo_data, tmp_path):
    args, says = _case_setup(name, tiny_llama, tiny_gpt2, memo_data, tmp_path)
    p = tunelab(*args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert says in p.stderr, p.stderr[-1500:]
    assert last.startswith(f"tunelab {args[0]}: error:") or "invalid config" in p.stderr


def test_set_reaches_a_hybrids_components_by_index_and_name(tiny_llama, memo_data, tmp_path):
    from tunelab.config import load_config

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", [{"name": "prefix"}, {"name": "lora"}])
    c = load_config(cfg, ["strategy.1.r=4", "strategy.prefix.num_virtual_tokens=3"])
    assert c.strategy[1].r == 4 and c.strategy[0].num_virtual_tokens == 3
    assert cfg["strategy"] == [{"name": "prefix"}, {"name": "lora"}]  # the caller's dict is untouched


def test_debug_shows_the_traceback(tmp_path):
    p = tunelab("--debug", "validate", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "Traceback" in p.stderr and "config file not found" in p.stderr
