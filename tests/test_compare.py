"""tunelab compare and its report (issue 10, points 2, 3 and 6): a tiny-model comparison end to end."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

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


def means(out) -> list[dict]:
    """results.csv's aggregate rows: one per variant."""
    return [r for r in csv.DictReader((out / "results.csv").open()) if r["row"] == "mean"]


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
    # without callbacks each variant trained in a process of its own (its run marker holds that process's id)
    pids = {n: json.loads((out / "variants" / n / ".tunelab-run").read_text())["pid"] for n in ("lora", "full")}
    assert os.getpid() not in pids.values() and pids["lora"] != pids["full"]

    every = list(csv.DictReader((out / "results.csv").open()))
    # one row per run and one aggregate row per variant (one seed here: the same figures)
    assert [(r["variant"], r["row"]) for r in every] == [
        (n, kind) for n in ("zero-shot", "lora", "full", "broken") for kind in ("run", "mean")
    ]
    rows = [r for r in every if r["row"] == "mean"]
    for r in rows[:3]:
        for key in ("score", "kl_to_base", "trainable", "trainable_pct", "peak_mb", "wall_time_s", "artefact_mb"):
            assert r[key] != "", (r["variant"], key)
    assert rows[0]["trainable"] == "0" and rows[0]["train_time_s"] == "0.0"
    assert int(rows[2]["trainable"]) > int(rows[1]["trainable"]) > 0
    assert float(rows[2]["artefact_mb"]) > float(rows[1]["artefact_mb"])
    assert rows[3]["state"] == "failed" and rows[3]["score"] == ""

    md = (out / "report.md").read_text()
    assert "best task score" in md.casefold() and "broken" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html.replace("http-equiv", "")
    for name in ("score_vs_forgetting", "score_vs_trainable", "score_vs_time", "loss_curves"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    rec = json.loads((out / "recommendation.json").read_text())
    assert set(rec["tied_for_best"]) <= {"zero-shot", "lora", "full"} and rec["pareto_front"]
    assert rec["best_score"] == (rec["tied_for_best"][0] if len(rec["tied_for_best"]) == 1 else None)

    # a second run skips every finished variant and tries the failed one again; the CLI's exit code says that
    # a variant failed, in one line naming it and where its error is
    before = (out / "variants" / "full" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", grid]) == 1
    assert (out / "variants" / "full" / "summary.json").stat().st_mtime_ns == before
    said = capsys.readouterr()
    assert "broken: failed" in said.out
    (last,) = said.err.strip().splitlines()
    assert last.startswith("tunelab compare: error: 1 variant(s) gave no result: broken (failed: ")
    assert f"Errors are in {out}/status.json" in last

    # the report is rebuilt from the files alone
    for f in ("report.html", "report.md", "results.csv"):
        (out / f).unlink()
    assert main(["report", str(out), "--within", "50"]) == 1  # rebuilt; the failed variant still counts
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


def test_variants_with_extra_tasks_are_scored_on_the_comparisons_own_data(tiny_llama, memo_data, tmp_path):
    from conftest import write_jsonl

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"say {w} ?", "completion": w} for w in "abcd"] * 4)
    own = {"name": "memo", "train": str(memo_data), "eval": str(memo_data)}
    extra = {"name": "other", "train": str(other), "eval": str(other)}
    variants = [
        {"name": "lora", "strategy": "lora"},
        {"name": "joint", "strategy": "lora", "mode": "multitask", "tasks": [own, extra]},
        {"name": "after-other", "strategy": "lora", "mode": "continual", "tasks": [extra, own]},
    ]
    out = compare(write_grid(tmp_path, tiny_llama, memo_data, variants, baseline=False))
    rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert [rows[n]["extra_tasks"] for n in ("lora", "joint", "after-other")] == ["", "other", "other"]
    joint = json.loads((out / "variants" / "joint" / "summary.json").read_text())
    assert float(rows["joint"]["score"]) == joint["multitask"]["eval"]["memo"]["exact_match"]
    seq = json.loads((out / "variants" / "after-other" / "summary.json").read_text())
    assert float(rows["after-other"]["score"]) == seq["continual"]["matrix"][-1][1]  # memo, after the sequence
    # a continual run: both tasks' training time and loss curve, one after the other
    assert float(rows["after-other"]["train_time_s"]) == pytest.approx(
        sum(t["train_time_s"] for t in seq["train"]), abs=0.01
    )
    from tunelab.lab.results import loss_curve

    steps = [s for s, _ in loss_curve(out / "variants" / "after-other")]
    assert steps == sorted(steps) and steps[-1] == 12

    # extra tasks, but not the comparison's own data among them: refused
    elsewhere = [{"name": "x", "strategy": "lora", "mode": "multitask", "tasks": [extra, {**extra, "name": "y"}]}]
    with pytest.raises(ConfigError, match="variant x: tasks must include the comparison's own data"):
        load_grid(write_grid(tmp_path, tiny_llama, memo_data, elsewhere))


def test_with_a_budget_in_steps_every_variant_trains_on_the_same_batch(tiny_llama, memo_data, tmp_path):
    variants = [
        {"name": "a", "strategy": "lora"},
        {"name": "b", "strategy": "lora", "set": ["training.grad_accum=2"]},
    ]
    with pytest.raises(ConfigError, match=r"different batches \(batch_size × grad_accum: a 4, b 8\)"):
        load_grid(write_grid(tmp_path, tiny_llama, memo_data, variants))
    path = write_grid(tmp_path, tiny_llama, memo_data, variants)
    grid = yaml.safe_load(open(path))
    grid["base"]["training"].pop("max_steps")
    grid["base"]["training"]["max_tokens"] = 2000  # a budget in tokens: batches may differ
    open(path, "w").write(yaml.safe_dump(grid))
    _, configs = load_grid(path)
    assert configs["b"].training.grad_accum == 2 and configs["b"].training.max_tokens == 2000
    with pytest.raises(ConfigError, match="variant c: sets training.max_tokens"):
        grid["variants"] = [{"name": "c", "strategy": "lora", "set": ["training.max_tokens=9"]}]
        open(path, "w").write(yaml.safe_dump(grid))
        load_grid(path)


def test_continuing_refuses_a_changed_base_or_variant_and_runs_added_variants(
    tiny_llama, memo_data, tmp_path, capsys
):
    path = write_grid(tmp_path, tiny_llama, memo_data, [{"name": "lora", "strategy": "lora"}], baseline=False)
    out = compare(path)
    grid = yaml.safe_load(open(path))
    grid["base"]["training"]["max_steps"] = 7
    open(path, "w").write(yaml.safe_dump(grid))
    assert main(["compare", path]) == 2
    assert "different base config" in capsys.readouterr().err
    grid["base"]["training"]["max_steps"] = 6
    grid["variants"] = [{"name": "lora", "strategy": {"name": "lora", "r": 4}}]
    open(path, "w").write(yaml.safe_dump(grid))
    assert main(["compare", path]) == 2
    assert "variant(s) lora changed since they ran" in capsys.readouterr().err
    grid["variants"] = [{"name": "lora", "strategy": "lora"}, {"name": "full", "strategy": "full"}]
    open(path, "w").write(yaml.safe_dump(grid))
    assert main(["compare", path]) == 0
    assert "lora: done earlier, skipped" in capsys.readouterr().out
    assert [r["variant"] for r in means(out)] == ["lora", "full"]


def test_the_guide_preset_runs_every_variant_end_to_end(tiny_llama, tmp_path, capsys):
    # the guide's grid on a tiny model for 2 steps: every variant (baselines, every strategy family, hybrids,
    # multitask, continual, a distilled student of the LoRA variant) runs and reaches the report
    from tunelab.lab.compare import claim
    from tunelab.lab.presets import write_preset

    out = tmp_path / "guide"
    claim(out)
    (out / "data").mkdir()
    path = write_preset("guide", out, steps=2, model=str(tiny_llama))
    grid = yaml.safe_load(path.read_text())
    assert grid["base"]["model"] == str(tiny_llama) and grid["base"]["training"]["max_steps"] == 2
    grid["base"]["training"]["max_length"] = 768  # the tiny tokenizer spells words out: longer rows
    grid["variants"][1]["set"] = ["training.max_length=4096"]  # 4-shot
    path.write_text(yaml.safe_dump(grid))
    compare(path)
    status = json.loads((out / "status.json").read_text())
    assert {n: s for n, s in status.items() if s["state"] != "done"} == {}
    rows = means(out)
    assert len(rows) == 21 and [r["variant"] for r in rows][:2] == ["zero-shot", "4-shot"]
    assert all(r["score"] != "" and r["kl_to_base"] != "" for r in rows)
    by = {r["variant"]: r for r in rows}
    assert (
        by["multitask"]["extra_tasks"] == "sentiment, extraction"
        and by["continual"]["extra_tasks"] == "extraction"
    )
    # continuing skips what ran; the preset again with another budget is refused (its base differs)
    compare(path)
    assert capsys.readouterr().out.count("done earlier, skipped") == 21
    argv = ["compare", "--preset", "guide", "--output-dir", str(out), "--steps", "3", "--model", str(tiny_llama)]
    assert main(argv) == 2
    assert "different base config" in capsys.readouterr().err


def test_a_variant_whose_process_dies_is_recorded_and_the_rest_run(tiny_llama, memo_data, tmp_path, monkeypatch):
    # the kernel's OOM killer, or a crash: the variant's process ends without a word
    import multiprocessing

    from tunelab.lab import compare as compare_module
    from tunelab.lab import runner

    def dies(*args):
        os._exit(137)

    spawned = runner.run_in_child

    def run(cfg, resume):
        if cfg.strategy_names() != ["full"]:
            return spawned(cfg, resume)
        # this variant's child is forked, so that it runs `dies` (before it touches torch: a forked child of
        # a process whose thread pools have run can hang)
        with monkeypatch.context() as m:
            fork = multiprocessing.get_context("fork")
            m.setattr(runner, "_child", dies)
            m.setattr(runner.multiprocessing, "get_context", lambda _: fork)
            return spawned(cfg, resume)

    monkeypatch.setattr(compare_module, "run_in_child", run)
    variants = [{"name": "full", "strategy": "full"}, {"name": "lora", "strategy": "lora"}]
    out = compare(write_grid(tmp_path, tiny_llama, memo_data, variants, baseline=False))
    status = json.loads((out / "status.json").read_text())
    assert status["full"] == {
        "state": "failed",
        "error": "the variant's process died (exit code 137; out of memory?)",
    }
    assert status["lora"] == {"state": "done"}


def test_report_marks_a_variant_whose_files_were_lost_as_broken_and_names_damaged_files(
    tiny_llama, memo_data, tmp_path, capsys
):
    out = compare(write_grid(tmp_path, tiny_llama, memo_data, [{"name": "lora", "strategy": "lora"}]))
    assert main(["report", str(out)]) == 0
    summary = out / "variants" / "lora" / "summary.json"
    kept = summary.read_bytes()
    for harm, says in ((lambda: summary.unlink(), "missing"), (lambda: summary.write_bytes(kept[:40]), "JSON")):
        harm()
        capsys.readouterr()
        assert main(["report", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "lora (broken: " in err and str(summary) in err and says in err
        rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
        assert rows["lora"]["state"] == "broken" and rows["lora"]["score"] == ""
        assert rows["zero-shot"]["state"] == "done"
        rec = json.loads((out / "recommendation.json").read_text())
        assert "lora" in rec["unfinished"] and "lora" not in rec["pareto_front"] and rec["best_score"] != "lora"
        assert "lora (broken)" in (out / "report.md").read_text()
        assert '<tr class="broken">' in (out / "report.html").read_text()
    summary.write_bytes(kept)
    # the comparison's own files, truncated: one line naming the file, exit 2
    for name in ("status.json", "grid.yaml"):
        f = out / name
        whole = f.read_bytes()
        f.write_bytes(whole[: len(whole) // 2] + (b"{[" if name == "grid.yaml" else b""))
        capsys.readouterr()
        assert main(["report", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(f) in err and "Traceback" not in err, err
        f.write_bytes(whole)
    assert main(["report", str(out)]) == 0


def test_with_seeds_every_variant_runs_once_per_seed_and_the_report_gives_means_and_intervals(
    tiny_llama, memo_data, tmp_path, capsys
):
    variants = [{"name": "lora", "strategy": {"name": "lora", "r": 8}, "set": ["training.lr=2e-2"]}]
    grid = write_grid(tmp_path, tiny_llama, memo_data, variants, seeds=2)
    with pytest.raises(KeyboardInterrupt):  # stopped during lora's first seed
        compare(grid, callbacks=[crash_at(3)])
    out = compare(grid)  # continues: the baseline's seeds skipped, lora's first seed resumed, its second run
    said = capsys.readouterr().out
    assert "zero-shot/seed-42: done earlier" in said and "lora/seed-42: resuming" in said
    for run in ("zero-shot/seed-42", "zero-shot/seed-43", "lora/seed-42", "lora/seed-43"):
        summary = json.loads((out / "variants" / run / "summary.json").read_text())
        assert (out / "variants" / run / "predictions" / "eval.jsonl").is_file()
        assert yaml.safe_load((out / "variants" / run / "config.yaml").read_text())["training"]["seed"] == int(
            run[-2:]
        )
    assert summary["eval"]["primary"] == "exact_match"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seed"], r["row"]) for r in rows] == [
        ("zero-shot", "42", "run"), ("zero-shot", "43", "run"), ("zero-shot", "", "mean"),
        ("lora", "42", "run"), ("lora", "43", "run"), ("lora", "", "mean"),
    ]  # fmt: skip
    lora = rows[-1]
    runs = [float(r["score"]) for r in rows[3:5]]
    assert float(lora["score"]) == pytest.approx(sum(runs) / 2) and lora["runs"] == "2/2"
    assert float(lora["score_lo"]) <= float(lora["score"]) <= float(lora["score_hi"])
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["intervals"] == "16 eval rows × 2 seeds, paired" and set(rec["scores"]) == {"zero-shot", "lora"}
    md = (out / "report.md").read_text()
    assert "## Every run" in md and "Task score (95% interval)" in md

    # seeds cannot be switched off for a comparison that ran with them: the run dirs are laid out by seed
    plain = yaml.safe_load(open(grid))
    del plain["seeds"]
    open(grid, "w").write(yaml.safe_dump(plain))
    assert main(["compare", grid]) == 2
    assert "was run with seeds" in capsys.readouterr().err


def fake_run(run_dir, hits: list[int], *, kl: float = 0.01, trainable: int = 1000) -> None:
    """A finished run's files as tunelab writes them: its summary, config and scored answers."""
    from tunelab.evaluate import write_predictions

    run_dir.mkdir(parents=True)
    refs = [f"answer {i}" for i in range(len(hits))]
    preds = [r if h else "wrong" for r, h in zip(refs, hits, strict=True)]
    write_predictions(run_dir / "predictions" / "eval.jsonl", refs, preds, ["exact_match"], None)
    summary = {
        "strategy": ["lora"], "mode": "single", "eval": {"exact_match": sum(hits) / len(hits)},
        "forgetting": {"after": {"kl": kl, "exact_reproduction": 0.9}},
        "parameters": {"trainable": trainable, "trainable_pct": 0.1}, "memory": {"peak_mb": 900.0},
        "train": {"train_time_s": 10.0, "tokens_per_s": 500.0}, "wall_time_s": 20.0,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"strategy": [{"name": "lora"}]}))


@pytest.mark.parametrize("seeds", [None, 3])
def test_the_verdict_on_result_files_whose_answer_is_known(tmp_path, seeds):
    # 60 eval rows; "same" answers exactly as "base" does, "better" gets 18 more rows (30 points) right
    out = tmp_path / "cmp"
    variants = ["base", "same", "better"]
    grid = {
        "base": {"model": "unused", "data": {"train": "t.jsonl"}}, "baseline": False, "output_dir": str(out),
        "variants": [{"name": n, "strategy": "lora"} for n in variants], **({"seeds": seeds} if seeds else {}),
    }  # fmt: skip
    out.mkdir()
    (out / "grid.yaml").write_text(yaml.safe_dump(grid))
    rng = __import__("random").Random(0)
    keys = {n: [n] if seeds is None else [f"{n}/seed-{42 + i}" for i in range(seeds)] for n in variants}
    for i in range(seeds or 1):
        base = [int(rng.random() < 0.5) for _ in range(60)]
        zeros = [j for j, h in enumerate(base) if not h][:18]
        better = [1 if j in zeros else h for j, h in enumerate(base)]
        for name, hits in (("base", base), ("same", base), ("better", better)):
            fake_run(out / "variants" / keys[name][i], hits)
    (out / "status.json").write_text(json.dumps({k: {"state": "done"} for ks in keys.values() for k in ks}))
    from tunelab.lab.report import write_report

    write_report(out)
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["best_score"] == "better" and rec["tied_for_best"] == ["better"]
    assert rec["scores"]["base"]["vs_best"]["hi"] < 0 and rec["scores"]["same"]["vs_best"]["hi"] < 0
    md = (out / "report.md").read_text()
    assert "Best task score (exact match): **better**" in md and "below it beyond noise" in md

    # without the better variant, the two identical ones are tied: neither is crowned
    grid["variants"] = grid["variants"][:2]
    (out / "grid.yaml").write_text(yaml.safe_dump(grid))
    write_report(out)
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["best_score"] is None and rec["tied_for_best"] == ["base", "same"]
    md = (out / "report.md").read_text()
    assert "Tied for the best task score (exact match): **base**, **same**" in md
    assert "| base | lora | 4" in md and "| best |" in md and "| +0.0 tied |" in md


GRIDS = sorted((Path(__file__).parent.parent / "examples" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_every_shipped_comparison_grid_validates(path):
    grid, configs = load_grid(path)
    assert len(grid.variants) >= 3 and configs
    if grid.seeds:  # one run per variant and seed, each at its seed
        assert len(configs) == len(grid.variants) * len(grid.seed_list())
        assert all(cfg.training.seed == int(key.rsplit("seed-", 1)[1]) for key, cfg in configs.items())
    for v in grid.variants:
        if v.search:
            from tunelab.lab.space import candidates

            first = configs[grid.runs()[v.name][0][1]]
            assert len(candidates(v.search, grid.search, first)) == grid.search.candidates
            assert first.data.dev_split == "auto"  # a search chooses on a dev split


def test_there_are_plain_seeded_and_searched_grids():
    assert {p.name for p in GRIDS} >= {"plain.yaml", "seeds.yaml", "search.yaml"}


def test_the_guide_preset_takes_seeds_a_search_and_another_task(tiny_llama, tmp_path, capsys):
    from tunelab.lab.compare import claim
    from tunelab.lab.presets import SPACES, write_preset

    out = tmp_path / "guide"
    claim(out)
    (out / "data").mkdir()
    path = write_preset("guide", out, steps=9, model=str(tiny_llama), seeds=3, search=True, task="translation")
    grid, configs = load_grid(path)
    assert grid.seed_list() == [42, 43, 44] and len(configs) == 3 * len(grid.variants)
    assert {v.name for v in grid.variants if v.search} == set(SPACES)
    # the first cut after a third of the 9 steps (past the 3 of warmup), scored after a cool-down
    assert grid.search.min_steps == 3 and grid.search.cooldown == 0.33
    assert grid.base["data"]["train"].endswith("translation-train.jsonl") and grid.base["data"]["dev_split"] == 20
    student = configs["distilled-student/seed-43"]
    assert [s for s in student.strategy if s.name == "distill"][0].teacher == str(
        out / "variants" / "lora" / "seed-42"
    )
    multitask = configs["multitask/seed-42"]
    assert [t.name for t in multitask.tasks][0] == "translation" and multitask.tasks[0].dev_split == 20
    # from the CLI: the options are the preset's, and checked
    assert main(["compare", "--preset", "guide", "--task", "poetry", "--output-dir", str(tmp_path / "x")]) == 2
    assert (
        "unknown task 'poetry'; the guide runs on triage, extraction, translation, summaries"
        in capsys.readouterr().err
    )
    assert main(["compare", str(path), "--seeds", "3"]) == 2
    assert "go with --preset" in capsys.readouterr().err
