"""The Arrow data pipeline (issue 24): workers prepare what one process prepares, a second run reads the
cache, errors keep their file and line from any worker, Parquet is carved like JSONL, progress shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import build_tokenizer, write_jsonl
from tunelab import data, dataprep, sources
from tunelab.config import DataConfig
from tunelab.data import DataError, prepare_file, prepare_splits


def chats(n: int) -> list[dict]:
    """Chats of one to three turns and varied lengths, some with a system message."""
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for t in range(i % 3 + 1):
            msgs += [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                     {"role": "assistant", "content": f"answer {i}.{t}"}]  # fmt: skip
        out.append({"messages": msgs})
    return out


def same(a, b) -> bool:
    return (list(a.features) == list(b.features) and list(a.prompts) == list(b.prompts)
            and list(a.references) == list(b.references) and a.stats == b.stats)  # fmt: skip


def test_workers_prepare_what_one_process_prepares(tmp_path, home, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", chats(3000))
    cfg = DataConfig(train=str(path))
    monkeypatch.setattr(dataprep, "POOL_MIN_ROWS", 10**9)
    one = prepare_file(path, tok, cfg, 64)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "other-home"))
    monkeypatch.setattr(dataprep, "POOL_MIN_ROWS", 1)
    job = dataprep.Job(None, 64, "completion", {}, False, "x")
    assert dataprep.workers(3000, job) == min(len(os.sched_getaffinity(0)), 8)
    many = prepare_file(path, tok, cfg, 64)
    assert len(one.features) == 3000 and same(one, many)
    # the rows are what the one-row-at-a-time reference gives: the loss on every assistant turn
    f = one.features[1]
    trained = tok.decode([t for t, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != data.IGNORE])
    assert trained == "answer 1.0<|im_end|>\nanswer 1.1<|im_end|>\n"


def test_a_second_run_reads_the_cache_and_renders_nothing(tmp_path, home, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", chats(50))
    cfg = DataConfig(train=str(path))
    first = prepare_file(path, tok, cfg, 64)
    assert len(list((home / "data" / "prepared").iterdir())) == 1

    def refuse(*a, **k):
        raise AssertionError("rendered again")

    monkeypatch.setattr(data.Formatter, "render_many", refuse)
    assert same(prepare_file(path, tok, cfg, 64), first)
    # anything the rows depend on prepares them again: max_length, an option, the file's bytes, the tokenizer
    for changed in (
        lambda: prepare_file(path, tok, cfg, 32),
        lambda: prepare_file(path, tok, DataConfig(train=str(path), system_prompt="hi"), 64),
        lambda: prepare_file(write_jsonl(path, chats(49)), tok, cfg, 64),
        lambda: prepare_file(path, _other_template(), cfg, 64),
    ):
        with pytest.raises(AssertionError, match="rendered again"):
            changed()


def _other_template():
    t = build_tokenizer()
    t.chat_template = t.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return t


def test_a_bad_row_in_a_worker_names_its_file_and_line_and_nothing_is_cached(tmp_path, home, tok, monkeypatch):
    monkeypatch.setattr(dataprep, "POOL_MIN_ROWS", 1)
    rows = [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(5000)]
    rows[3500] = {"prompt": "no answer"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:3501: missing field 'completion' \(set data.skip_bad_rows"):
        prepare_file(path, tok, DataConfig(train=str(path)), 64)
    assert not any((home / "data" / "prepared").glob("*/meta.json"))
    skipped = prepare_file(path, tok, DataConfig(train=str(path), skip_bad_rows=True), 64)
    assert (skipped.stats.rows, skipped.stats.used, skipped.stats.skipped) == (5000, 4999, 1)
    assert skipped.stats.reasons[0].endswith("d.jsonl:3501: missing field 'completion'")
    lines = path.read_text().splitlines()
    lines[3999] = '{"prompt": "broken'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:4000: not valid JSON"):  # not skippable: the file is damaged
        prepare_file(path, tok, DataConfig(train=str(path), skip_bad_rows=True), 64)


@pytest.mark.parametrize(
    ("suffix", "good"), [("jsonl", '{"prompt": "a", "completion": "b"}\n'), ("csv", "prompt,completion\na,b\n")]
)
def test_a_byte_that_is_not_utf8_names_its_line(tmp_path, home, tok, suffix, good):
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(good.encode() + b"caf\xe9,x\n")
    bad = len(good.splitlines()) + 1
    with pytest.raises(DataError, match=rf"d.{suffix}:{bad}: not UTF-8 text \(byte 0xe9 at column 4\)"):
        prepare_file(path, tok, DataConfig(train=str(path)), 64)


def test_parquet_is_read_in_batches_and_carved_like_jsonl(tmp_path, home, tok, monkeypatch):
    import pandas as pd

    monkeypatch.setattr(dataprep, "CHUNK", 7)  # several record batches and chunks, a carve across them
    monkeypatch.setattr(sources, "BATCH", 9)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(60)]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet", row_group_size=16)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    splits = {}
    for path in (jsonl, tmp_path / "d.parquet"):
        cfg = DataConfig(train=str(path), eval_split=0.2, dev_split=5)
        tr, ev = prepare_splits(cfg, tok, 64, seed=0)
        _, dev = prepare_splits(cfg, tok, 64, seed=0, score_on="dev")
        splits[path.suffix] = (list(tr.references), list(ev.references), list(dev.references))
    assert splits[".jsonl"] == splits[".parquet"]
    tr, ev, dev = splits[".jsonl"]
    assert (len(tr), len(ev), len(dev)) == (43, 12, 5) and not set(tr) & set(ev) | set(tr) & set(dev)


def test_reading_and_preparing_show_rows_per_second_and_quiet_silences_them(tmp_path, home, tok, monkeypatch,
                                                                              capsys):  # fmt: skip
    monkeypatch.setenv("TUNELAB_PROGRESS", "1")
    monkeypatch.setattr(sources, "BAR_MIN_BYTES", 0)
    rows = [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(3000)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepare_file(path, tok, DataConfig(train=str(path)), 64)
    err = capsys.readouterr().err
    assert "reading d.jsonl" in err and "preparing d.jsonl" in err and "rows/s" in err
    monkeypatch.setenv("TUNELAB_VERBOSITY", "quiet")
    path = write_jsonl(tmp_path / "e.jsonl", rows[:2000])
    prepare_file(path, tok, DataConfig(train=str(path)), 64)
    assert "reading" not in capsys.readouterr().err


def test_text_stays_text_through_the_arrow_tables(tmp_path, home, tok):
    tricky = ["2021-03-04", "NA", "007", "true", "1e5", "null"]
    rows = [{"prompt": f"value {i}", "completion": v} for i, v in enumerate(tricky)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json"):
        assert (
            list(prepare_file(path, tok, DataConfig(train=str(path), template="plain"), 64).references) == tricky
        )


def test_a_home_that_cannot_be_written_prepares_in_a_temporary_directory(tmp_path, tok, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "a-file" / "home"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(30)])
    first = prepare_file(path, tok, DataConfig(train=str(path)), 64)
    again = prepare_file(path, tok, DataConfig(train=str(path)), 64)
    assert len(first.features) == 30 and same(first, again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "d.jsonl"]  # nothing kept anywhere else


def test_workers_end_with_the_pool_whatever_sigterm_handler_the_process_has(tmp_path):
    """The CLI turns SIGTERM into a clean stop, and forked workers inherit that handler; the pool ends its
    workers with SIGTERM when a bad row stops the preparation. A worker that handled the signal and went on
    waiting for a chunk left the pool's join waiting forever (a full test run hung there). Here the handler
    does nothing at all, so a worker that keeps it never ends."""
    rows = chats(6000)
    rows[100] = {"messages": "not a list"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code = textwrap.dedent(
        f"""
        import signal
        import conftest
        from tunelab import dataprep
        from tunelab.config import DataConfig
        from tunelab.data import DataError, prepare_file
        signal.signal(signal.SIGTERM, lambda *_: None)
        dataprep.POOL_MIN_ROWS = 1
        try:
            prepare_file({str(path)!r}, conftest.build_tokenizer(), DataConfig(train={str(path)!r}), 64)
        except DataError as e:
            print(e)
        """
    )
    env = {**os.environ, "TUNELAB_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).parent),
           "TUNELAB_PROGRESS": "0"}  # fmt: skip
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the pool did not end: it waited for a worker that handled SIGTERM and went on")
    assert p.returncode == 0 and f"{path}:101:" in p.stdout, p.stderr[-2000:]
