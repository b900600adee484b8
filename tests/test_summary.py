"""summary.json: one versioned schema (docs/summary.md) that every run mode's summary fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MEMO_ROWS, tiny_config, write_jsonl
from tunelab.modes import MODES
from tunelab.run import train
from tunelab.summary import SUMMARY_VERSION, Summary, TaskTrainStats

DOC = Path(__file__).resolve().parents[1] / "docs" / "summary.md"


def mode_config(mode: str, model: Path, tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", MEMO_ROWS * 2)
    cfg = tiny_config(model, data, tmp_path / "run", "lora", max_steps=2)
    cfg["eval"]["before"] = True
    if mode in ("continual", "multitask"):
        del cfg["data"]
        cfg["mode"] = mode
        cfg["tasks"] = [{"name": n, "train": str(data), "eval": str(data)} for n in ("a", "b")]
    return cfg


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_writes_a_summary_that_fits_the_schema(mode, tiny_llama, tmp_path):
    result = train(mode_config(mode, tiny_llama, tmp_path))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == result.summary
    s = Summary.model_validate(written)
    assert s.summary_version == SUMMARY_VERSION and s.mode == mode
    assert isinstance(s.train, list) == (mode == "continual")
    if mode == "continual":
        assert [t.task for t in s.train] == ["a", "b"] and s.continual.tasks == ["a", "b"]
    elif mode == "multitask":
        assert s.multitask.tasks == ["a", "b"] and set(s.multitask.eval) == set(s.multitask.eval_before)
    else:
        assert s.eval is not None and s.eval_before is not None and s.data is not None
    # the mode's own section says what its headline scores are, and the model card shows them
    rows = s.headline()
    if mode == "single":
        assert rows and all(k in s.eval for k, _, _ in rows)
    else:
        assert [k.split(":")[0] for k, _, _ in rows[:2]] == ["a", "b"]
        assert all(after is not None for _, _, after in rows)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "## Scores" in card and all(f"| {k} |" in card for k, _, _ in rows)


def test_the_schema_refuses_what_it_does_not_know():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="extra"):
        TaskTrainStats.model_validate({"task": "a", "surprise": 1})


def test_docs_describe_every_key_of_the_schema():
    from pydantic import BaseModel

    doc = DOC.read_text()
    assert f"summary_version: {SUMMARY_VERSION}" in doc

    def keys(model: type[BaseModel]) -> set[str]:
        out = set(model.model_fields)
        for f in model.model_fields.values():
            for arg in (f.annotation, *getattr(f.annotation, "__args__", ())):
                inner = getattr(arg, "__args__", (arg,))
                for t in (arg, *inner):
                    if isinstance(t, type) and issubclass(t, BaseModel):
                        out |= keys(t)
        return out

    missing = sorted(k for k in keys(Summary) if f"`{k}`" not in doc)
    assert missing == []


def test_the_untouched_models_scores_are_kept_and_read_back_by_a_run_like_it(
    tiny_llama, memo_data, tmp_path, monkeypatch
):
    """eval_before depends only on the weights, the scored rows, the eval settings, precision, device,
    attention and strategies: a second run like the first (another seed, another output dir) reads them from
    TUNELAB_HOME instead of scoring again; a change to the scored rows scores again."""
    import sys

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    session = sys.modules["tunelab.session"]
    calls = []
    real = session.score
    monkeypatch.setattr(session, "score", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))

    def config(out, **training):
        cfg = tiny_config(tiny_llama, memo_data, tmp_path / out, **training)
        cfg["eval"]["before"] = True
        return cfg

    first = train(config("a", max_steps=1)).summary
    assert calls.count("eval before training") == 1
    second = train(config("b", max_steps=2, seed=7)).summary
    assert calls.count("eval before training") == 1 and second["eval_before"] == first["eval_before"]
    assert len(list((tmp_path / "home" / "base-scores").iterdir())) == 1
    other = tmp_path / "other.jsonl"
    other.write_text("".join(memo_data.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    cfg = config("c", max_steps=1)
    cfg["data"]["eval"] = str(other)
    train(cfg)
    assert calls.count("eval before training") == 2
