"""tunelab compare and its report (issue 10, points 2, 3 and 6): a tiny-model comparison end to end."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import crash_at, tiny_config
from tunelab.cli import main
from tunelab.config import ConfigError
from tunelab.lab.compare import compare
from tunelab.lab.grid import load_grid


def write_grid(tmp_path, model, data, variants, **extra) -> str:
    base = tiny_config(model, data, tmp_path / "unused", "lora", max_steps=6, save_steps=2, max_length=128)
    del base["output_dir"], base["strategy"]
    grid = {"base": base, "variants": variants, "output_dir": str(tmp_path / "cmp"), **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


VARIANTS = [
    {"name": "zero-shot", "strategy": {"name": "prompt-only"}},
    {"name": "lora", "strategy": {"name": "lora", "r": 8}, "set": ["training.lr=2e-2"]},
    {"name": "full", "strategy": "full"},
    # fails at run time (its teacher does not exist): recorded, and the comparison goes on
    {"name": "broken", "strategy": ["lora", {"name": "distill", "teacher": "/nonexistent/teacher"}]},
]


def test_a_comparison_end_to_end(tiny_llama, memo_data, tmp_path, capsys):
    grid = write_grid(tmp_path, tiny_llama, memo_data, VARIANTS)
    # killed during the first variant that trains: the comparison stops, and says where it is
    with pytest.raises(KeyboardInterrupt):
        compare(grid, callbacks=[crash_at(3)])
    status = json.loads((tmp_path / "cmp" / "status.json").read_text())
    assert status == {"zero-shot": {"state": "done"}, "lora": {"state": "interrupted"}}

    out = compare(grid)  # continues: zero-shot skipped, lora resumed from its checkpoint, the rest run
    said = capsys.readouterr().out
    assert "zero-shot: done earlier, skipped" in said and "lora: resuming" in said
    lora = json.loads((out / "variants" / "lora" / "summary.json").read_text())
    assert lora["train"]["resumed_from"] == "checkpoint-2"
    status = json.loads((out / "status.json").read_text())
    assert [status[n]["state"] for n in ("zero-shot", "lora", "full", "broken")] == [
        "done",
        "done",
        "done",
        "failed",
    ]
    assert "/nonexistent/teacher" in status["broken"]["error"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["zero-shot", "lora", "full", "broken"]
    for r in rows[:3]:
        for key in ("score", "kl_to_base", "trainable", "trainable_pct", "peak_mb", "wall_time_s", "artefact_mb"):
            assert r[key] != "", (r["variant"], key)
    assert rows[0]["trainable"] == "0" and rows[0]["train_time_s"] == "0.0"
    assert int(rows[2]["trainable"]) > int(rows[1]["trainable"]) > 0
    assert float(rows[2]["artefact_mb"]) > float(rows[1]["artefact_mb"])
    assert rows[3]["state"] == "failed" and rows[3]["score"] == ""

    md = (out / "report.md").read_text()
    assert "Best task score" in md and "broken" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html.replace("http-equiv", "")
    for name in ("score_vs_forgetting", "score_vs_trainable", "score_vs_time", "loss_curves"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["best_score"] in {"zero-shot", "lora", "full"} and rec["pareto_front"]

    # a second run skips every finished variant and tries the failed one again
    before = (out / "variants" / "full" / "summary.json").stat().st_mtime_ns
    compare(grid)
    assert (out / "variants" / "full" / "summary.json").stat().st_mtime_ns == before
    assert "broken: failed" in capsys.readouterr().out

    # the report is rebuilt from the files alone
    for f in ("report.html", "report.md", "results.csv"):
        (out / f).unlink()
    assert main(["report", str(out), "--within", "50"]) == 0
    assert (out / "report.html").is_file() and json.loads((out / "recommendation.json").read_text())[
        "within"
    ] == 50
    assert main(["report", str(out), "--within", "150"]) == 2
    assert main(["report", str(out / "variants")]) == 2 and "not a comparison directory" in capsys.readouterr().err


def test_a_variant_may_not_change_the_data_seed_or_budget(tiny_llama, memo_data, tmp_path):
    for variant, key in [
        ({"name": "more-steps", "strategy": "lora", "set": ["training.max_steps=100"]}, "training.max_steps"),
        ({"name": "other-seed", "strategy": "lora", "training": {"seed": 7}}, "training.seed"),
        ({"name": "other-data", "strategy": "lora", "data": {"train": str(memo_data)}}, "data"),
    ]:
        grid = write_grid(tmp_path, tiny_llama, memo_data, [variant])
        with pytest.raises(ConfigError, match=f"variant {variant['name']}: sets {key}"):
            load_grid(grid)


def test_every_variant_is_validated_before_the_first_runs(tiny_llama, memo_data, tmp_path):
    variants = [{"name": "ok", "strategy": "lora"}, {"name": "typo", "strategy": {"name": "lora", "rr": 8}}]
    grid = write_grid(tmp_path, tiny_llama, memo_data, variants)
    with pytest.raises(ConfigError, match="variant typo: .*strategy"):
        compare(grid)
    assert not (tmp_path / "cmp" / "variants").exists()
    dup = write_grid(tmp_path, tiny_llama, memo_data, [{"name": "a", "strategy": "lora"}] * 2)
    with pytest.raises(ConfigError, match="names repeat"):
        load_grid(dup)


def test_a_prompt_baseline_row_is_added_unless_one_is_there(tiny_llama, memo_data, tmp_path):
    plain = [{"name": "lora", "strategy": "lora"}, {"name": "full", "strategy": "full"}]
    _, configs = load_grid(write_grid(tmp_path, tiny_llama, memo_data, plain))
    assert list(configs) == ["zero-shot", "lora", "full"]
    assert configs["zero-shot"].strategy_names() == ["prompt-only"]
    few = [{"name": "4-shot", "strategy": {"name": "prompt-only", "shots": 4}}, *plain]
    assert list(load_grid(write_grid(tmp_path, tiny_llama, memo_data, few))[1]) == ["4-shot", "lora", "full"]
    off = write_grid(tmp_path, tiny_llama, memo_data, plain, baseline=False)
    assert list(load_grid(off)[1]) == ["lora", "full"]
    taken = [{"name": "zero-shot", "strategy": "lora"}]  # the name is taken by a trained variant
    assert list(load_grid(write_grid(tmp_path, tiny_llama, memo_data, taken))[1]) == [
        "prompt-baseline",
        "zero-shot",
    ]


def test_a_comparison_never_writes_into_a_directory_it_did_not_make(tiny_llama, memo_data, tmp_path):
    (tmp_path / "cmp").mkdir()
    mine = tmp_path / "cmp" / "report.md"
    mine.write_text("my own notes")
    grid = write_grid(tmp_path, tiny_llama, memo_data, [{"name": "lora", "strategy": "lora"}])
    assert main(["compare", grid]) == 2
    assert mine.read_text() == "my own notes" and sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "report.md"
    ]
