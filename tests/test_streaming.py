"""Training from a file as it is read (``data.streaming``, issue 24): the index finds every row and line the
prepared path reads, an epoch trains every row once in length-grouped windows, a kill -9 resumes bit-identical,
errors name file:line, and a file bigger than a memory limit set for the test trains under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import WORDS, final_weights, tiny_config, write_jsonl
from tunelab import streaming
from tunelab.config import DataConfig, RunConfig
from tunelab.data import DataError, prepare_splits
from tunelab.run import train
from tunelab.sources import open_source

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = list(WORDS)
    return [
        {"prompt": " ".join(rng.choice(words, 1 + i % 17)), "completion": " ".join(rng.choice(words, 1 + i % 3))}
        for i in range(n)
    ]


def awkward_files(tmp_path: Path) -> dict[str, Path]:
    """The same 60 rows as JSON Lines (a byte-order mark, blank lines, U+2028 inside a string), CSV (quoted
    newlines, a blank line) and Parquet (row groups of 20)."""
    rows = [{"prompt": f"q{i}" + ("\u2028x" if i == 5 else "") + ("\nsecond line" if i % 9 == 0 else ""),
             "completion": f"a{i}"} for i in range(60)]  # fmt: skip
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for i in (3, 20, 21, 44):
        lines[i] = lines[i] + "\n  \t"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    csv_path = tmp_path / "a.csv"
    quoted = ['"{}"'.format(v.replace('"', '""')) for r in rows for v in (r["prompt"],)]
    body = [f"{q},{r['completion']}" for q, r in zip(quoted, rows, strict=True)]
    body.insert(30, "")
    csv_path.write_text("prompt,completion\n" + "\n".join(body) + "\n")
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=20)
    return {"jsonl": jsonl, "csv": csv_path, "parquet": parquet}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_the_index_reads_every_row_and_line_the_prepared_path_reads(kind, tmp_path, home, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK", 8)  # many blocks
    monkeypatch.setattr(streaming, "PIECE", 97)  # pieces that cut lines
    path = awkward_files(tmp_path)[kind]
    src, ref = streaming.open_stream(path), open_source(path)
    assert src.n == ref.n == 60
    assert src.all_rows() == ref.all_rows()
    if kind != "parquet":
        assert len(src.sizes) == 8 and src.sizes.sum() == 60
    else:
        assert list(src.sizes) == [20, 20, 20]
    for b in range(len(src.sizes)):  # each block alone, as training reads it (a row group: pieces of 8)
        pieces = list(src.pieces(b))
        assert [len(p) for _, _, p in pieces] == ([8, 8, 4] if kind == "parquet" else [src.sizes[b]])
        for first, lines, payloads in pieces:
            assert [src.parsed(ln, p) for ln, p in zip(lines, payloads, strict=True)] == [
                ref.row(i) for i in range(first, first + len(payloads))
            ]
    assert src.row(37) == ref.row(37)


def test_an_epoch_trains_every_row_once_in_length_sorted_windows(tmp_path, home, tok, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK", 64)
    path = write_jsonl(tmp_path / "d.jsonl", pairs(2020))
    cfg = DataConfig(train=str(path), eval_split=0.01, shuffle_buffer=100)
    prepared, held_out = prepare_splits(cfg, tok, 64, seed=3)
    stream, held_out_too = prepare_splits(cfg, tok, 64, seed=3, stream=4)
    rows = stream.features
    assert rows.n == len(prepared.features) == 2000 and len(held_out_too.features) == 20
    assert list(held_out.features) == list(held_out_too.features)  # the same rows carved out

    def key(r) -> tuple:
        return tuple(int(x) for x in r["input_ids"]), tuple(int(x) for x in r["labels"])

    it = iter(rows)
    epochs = [[next(it) for _ in range(2000)] for _ in range(2)]
    want = Counter(key(r) for r in prepared.features)
    for epoch in epochs:
        assert Counter(key(r) for r in epoch) == want  # each row once, no held-out row
        for w in range(0, 2000, 200):  # windows of 50 batches of 4, longest first
            lengths = [r["length"] for r in epoch[w : w + 200]]
            assert lengths == sorted(lengths, reverse=True)
    assert [key(r) for r in epochs[0]] != [key(r) for r in epochs[1]]  # another order each epoch
    first_window = Counter(key(r) for r in epochs[0][:200])
    assert first_window != Counter(key(r) for r in list(prepared.features)[:200])  # not file order
    again = iter(rows)
    assert [key(next(again)) for _ in range(2500)] == [key(r) for r in (epochs[0] + epochs[1])[:2500]]
    assert stream.stats.as_dict() | {"skip_reasons": []} == {
        "rows": 2000, "used": 2000, "skipped": 0, "skip_reasons": [], "streamed": True, "read": 2000
    }  # fmt: skip


def test_a_bad_row_in_a_stream_names_its_file_and_line(tmp_path, home, tok, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK", 16)
    rows = [json.dumps(r) for r in pairs(100)]
    rows[70] = '{"prompt": "no completion"}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    stream, _ = prepare_splits(DataConfig(train=str(path)), tok, 64, seed=0, stream=4)
    with pytest.raises(DataError, match=rf"{path}:71: missing field 'completion'"):
        list(zip(range(300), stream.features, strict=False))
    skipping, _ = prepare_splits(DataConfig(train=str(path), skip_bad_rows=True), tok, 64, seed=0, stream=4)
    got = [r for _, r in zip(range(99), skipping.features, strict=False)]
    assert len(got) == 99 and skipping.stats.skipped == 1 and "bad.jsonl:71" in skipping.stats.reasons[0]
    raw = path.read_bytes().replace(b"no completion", b"no \xff completion")
    path.write_bytes(raw.replace(b'"no \xff completion"}', b'"no \xff completion", "completion": "x"}'))
    stream, _ = prepare_splits(DataConfig(train=str(path)), tok, 64, seed=0, stream=4)
    with pytest.raises(DataError, match=rf"{path}:71: not UTF-8 text \(byte 0xff"):
        list(zip(range(300), stream.features, strict=False))


def test_streaming_is_refused_where_it_cannot_work(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(10))
    base = tiny_config(tiny_llama, data, tmp_path / "run")
    base["data"]["streaming"] = True
    with pytest.raises(ValueError, match="data.streaming: true: replay changes the training rows"):
        RunConfig.model_validate({**base, "strategy": ["lora", {"name": "replay", "retention": True}]})
    tasks = [{"name": n, "train": str(data), "eval": str(data), "streaming": True} for n in ("a", "b")]
    with pytest.raises(ValueError, match="tasks: streaming: true: mode continual prepares each task whole"):
        RunConfig.model_validate({k: v for k, v in base.items() if k != "data"} | {"tasks": tasks})
    array = tmp_path / "d.json"
    array.write_text(json.dumps(pairs(10)))
    with pytest.raises(DataError, match="a .json file is one array, parsed whole; write it as JSON Lines"):
        streaming.open_stream(array)
    fake = tmp_path / "d.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DataError, match=f"{fake}: could not be read as parquet"):
        streaming.open_stream(fake)


def test_a_streamed_run_keeps_max_tokens_and_says_it_streamed(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(300))
    cfg = tiny_config(tiny_llama, data, tmp_path / "run", max_steps=None, max_tokens=900)
    cfg["training"].pop("max_steps")
    cfg["data"] = {"train": str(data), "eval_split": 0.05, "streaming": True}
    s = train(cfg).summary
    assert s["train"]["streamed"] and s["data"]["train"]["streamed"] and s["data"]["train"]["rows"] == 285
    assert 900 <= s["train"]["tokens_seen"] < 900 + 4 * 64  # stopped at the budget, within one batch
    assert s["data"]["eval"]["rows"] == 15


def _train_killed_at(cfg: dict, tmp_path: Path, step: int) -> subprocess.CompletedProcess:
    """`tunelab train` in a child that SIGKILLs itself once ``step`` is done (a real kill -9)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = textwrap.dedent(
        f"""
        import os, signal
        from transformers import TrainerCallback
        from tunelab import run
        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == {step}:
                    os.kill(os.getpid(), signal.SIGKILL)
        run.train({str(path)!r}, callbacks=[Kill()])
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)


def test_kill_9_then_resume_of_a_stream_gives_bit_identical_weights(tmp_path, tiny_llama, uneven_data):
    def config(out: str) -> dict:
        cfg = tiny_config(tiny_llama, uneven_data, tmp_path / out, "lora", max_steps=12, save_steps=5)
        cfg["data"] = {"train": str(uneven_data), "eval": str(uneven_data), "streaming": True, "shuffle_buffer": 5}
        return cfg

    whole = train(config("whole"))
    assert whole.summary["train"]["streamed"] and whole.summary["train"]["epochs"] == 3.0
    cfg = config("killed")
    proc = _train_killed_at(cfg, tmp_path, 7)  # in the second epoch: the resume crosses an epoch's end
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    p = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", str(tmp_path / "cfg.yaml"), "--resume"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume: continuing from checkpoint-5" in p.stdout
    a, b = final_weights(whole.run_dir), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


LIMITED = """
import json, resource, sys
limit = int(sys.argv[3])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from tunelab.run import train
train(sys.argv[1])
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmPeak"))
if limit:
    from tunelab.sources import open_source
    try:
        open_source(sys.argv[2])  # the prepared way maps the whole file: it must not fit under the limit
        mapped = True
    except (MemoryError, OSError):
        mapped = False
print(json.dumps({"peak_kb": peak, "mapped": mapped if limit else None}))
"""


def test_a_file_bigger_than_the_memory_limit_trains_when_streamed(tmp_path, tiny_llama):
    """The limit is the address space (RLIMIT_AS) a run on a 50-row file peaked at, plus three quarters of
    the big file's size: the big file cannot be held or mapped whole under it (the prepared way's map of it
    fails), yet a streamed run on it trains and saves."""
    small = write_jsonl(tmp_path / "small.jsonl", pairs(50))
    line = "\n".join(json.dumps(r) for r in pairs(1000, seed=1)) + "\n"
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for _ in range(800):  # 800k rows, about 70 MB
            f.write(line)
    size = big.stat().st_size
    env = {**ENV, "TUNELAB_HOME": str(tmp_path / "home"), "TUNELAB_PROGRESS": "0"}

    def run(data: Path, limit: int) -> dict:
        cfg = tiny_config(tiny_llama, data, tmp_path / f"run-{data.stem}", "lora", max_steps=2, save_steps=100)
        cfg["data"] = {"train": str(data), "eval": str(small), "streaming": True}
        path = tmp_path / f"{data.stem}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        p = subprocess.run([sys.executable, "-c", LIMITED, str(path), str(data), str(limit)],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    calibrated = run(small, 0)["peak_kb"] * 1024
    limit = calibrated + size * 3 // 4
    got = run(big, limit)
    assert got["peak_kb"] * 1024 <= limit and not got["mapped"]
    summary = json.loads((tmp_path / "run-big" / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["data"]["train"]["rows"] == 800_000
