"""The search over each strategy's knobs (issue 20, points 2, 3 and 9): successive halving on the dev split,
candidates continuing from their checkpoints, the eval file untouched until the finalists are scored, bad
spaces refused at validation, an interrupted search continuing where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import crash_at, tiny_config
from tunelab import data as data_module
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import RunError
from tunelab.lab.compare import compare
from tunelab.lab.search import SearchOptions, compute, rungs, stop_at
from tunelab.lab.space import candidates, knob_sets
from tunelab.modes import train


def test_the_plan_halves_by_eta_and_spends_well_under_the_exhaustive_grid():
    assert rungs(9, 30, 3, 1) == [(4, 9), (12, 3), (30, 1)]
    assert compute(rungs(9, 30, 3, 1)) == 9 * 4 + 3 * 8 + 18 == 78  # 29% of 9 × 30
    assert rungs(6, 27, 3, 1) == [(3, 6), (9, 2), (27, 1)] and compute(rungs(6, 27, 3, 1)) <= 0.4 * 6 * 27
    assert rungs(2, 10, 2, 1) == [(5, 2), (10, 1)]
    assert rungs(1, 10, 3, 1) == [(10, 1)]
    assert rungs(9, 30, 3, 8)[0] == (8, 9)  # min_steps: no cut before step 8
    # a cool-down of a third: 9 branches of 1 step after 4, 3 of 4 after 12, none at the budget
    assert compute(rungs(9, 30, 3, 1), 1 / 3) == 78 + 9 * 1 + 3 * 4
    assert compute(rungs(6, 18, 3, 1), 0.33) == 6 * (2 + 1) + 2 * (4 + 2) + 12 == 42  # 39% of 6 × 18


def test_a_rung_ranks_by_the_dev_metric_where_the_dev_split_tells_apart_and_by_dev_loss_where_it_cannot(tmp_path):
    from tunelab.evaluate import write_predictions
    from tunelab.lab.search import rank
    from tunelab.lab.space import Candidate

    refs = [f"answer {i}" for i in range(24)]

    def cand(i: int, right: int, loss: float) -> dict:  # answers the first `right` dev rows correctly
        preds = refs[:right] + ["wrong"] * (24 - right)
        write_predictions(tmp_path / f"c{i}" / "predictions" / "dev.jsonl", refs, preds, ["exact_match"], None)
        return {"steps": 3, "rows": 24, "metric": "exact_match", "score": right / 24, "loss": loss}

    cands = [Candidate(f"c{i}", {"lr": i}) for i in range(5)]
    scores = {"0": cand(0, 4, 0.36), "1": cand(1, 3, 0.22), "2": cand(2, 20, 0.50), "3": {"error": "OOM"}}
    scores["4"] = cand(4, 0, 0.90)
    # 20 of 24 is apart from the rest; 4, 3 and 0 of 24 are within noise of each other: by loss
    assert rank(tmp_path, cands, scores, [0, 1, 2, 3, 4]) == [2, 1, 0, 4, 3]
    (tmp_path / "c4" / "predictions" / "dev.jsonl").unlink()  # no answers on disk: the metric alone
    assert rank(tmp_path, cands, scores, [0, 1, 2, 3, 4]) == [2, 0, 1, 4, 3]


def test_knobs_resolve_to_the_strategys_own_options(tiny_llama, memo_data, tmp_path):
    cfg = load_config(tiny_config(tiny_llama, memo_data, tmp_path / "r", {"name": "lora", "r": 4}))
    assert knob_sets("r", 8, cfg) == ["strategy.lora.r=8"]
    assert knob_sets("lr", 1e-3, cfg) == ["training.lr=0.001"]
    own = load_config(tiny_config(tiny_llama, memo_data, tmp_path / "r", ["prefix", {"name": "lora", "lr": 1e-3}]))
    assert knob_sets("lr", 0.01, own) == ["training.lr=0.01", "strategy.lora.lr=0.01"]  # both train at it
    with pytest.raises(ValueError, match="no strategy of this variant \\(lora\\) has it; its knobs: lr, "):
        knob_sets("reduction_factor", 8, cfg)
    with pytest.raises(ValueError, match="never searched"):
        knob_sets("training.max_steps", 8, cfg)
    space = {"lr": {"log_uniform": [1e-4, 1e-2]}, "r": [4, 8]}
    got = candidates(space, SearchOptions(candidates=6), cfg)
    assert [c.knobs for c in got] == [
        {"lr": lr, "r": r} for lr in (1e-4, 1e-3, 1e-2) for r in (4, 8)
    ]  # the range spread to fill 6 candidates
    assert len(candidates({"lr": [1e-4, 2e-4, 3e-4, 4e-4], "r": [2, 4, 8]}, SearchOptions(candidates=6), cfg)) == 6


def test_a_candidate_cut_and_continued_equals_one_trained_longer(tiny_llama, memo_data, tmp_path):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "cut", "lora", max_steps=6, save_steps=100)
    train(cfg, callbacks=[stop_at(2)])
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut["train"]["steps"] == 2 and (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    train(cfg, resume=True, callbacks=[stop_at(2)])  # killed after its cut's checkpoint, before its summary
    again = json.loads((tmp_path / "cut" / "summary.json").read_text())  # no step past the cut
    assert again["train"]["steps"] == 2 and again["train"]["resumed_from"] == "checkpoint-2"
    rates = []

    class Rates(TrainerCallback):  # the rate each optimizer step used
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates.append((state.global_step + 1, optimizer.param_groups[0]["lr"]))

    train(cfg, resume=True, callbacks=[Rates(), stop_at(4, cooldown=2)])  # cut at 4, scored after a 2-step branch
    branch = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert branch["train"]["steps"] == 6 and branch["train"]["resumed_from"] == "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]  # the branch wrote no checkpoint
    lr, horizon = cfg["training"]["lr"], 6  # linear decay from lr over the 6 steps, no warmup
    scheduled = {t: lr * (1 - (t - 1) / horizon) for t in range(1, 7)}
    assert [t for t, _ in rates] == [3, 4, 5, 6]
    assert [r for _, r in rates] == pytest.approx(
        [scheduled[3], scheduled[4], scheduled[5] * 2 / 3, scheduled[6] * 1 / 3]
    )  # the schedule's rates up to the cut, then falling to zero
    train(cfg, resume=True)  # the next rung continues from the cut (checkpoint-4), not from the branch
    whole = dict(cfg, output_dir=str(tmp_path / "whole"))
    train(whole)
    a = load_file(tmp_path / "cut" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grid_file(tmp_path, model, data, variants, **extra) -> str:
    base = tiny_config(model, data, tmp_path / "unused", "lora", max_steps=6, save_steps=100, max_length=128)
    del base["output_dir"], base["strategy"]
    base["data"]["dev_split"] = 4
    grid = {"base": base, "variants": variants, "output_dir": str(tmp_path / "cmp"), **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


SEARCHED = [{"name": "lora", "strategy": {"name": "lora", "r": 4}, "search": {"lr": [1e-4, 3e-2, 5e-1]}}]


def test_a_search_chooses_on_dev_and_the_eval_file_is_untouched_until_the_finalists(
    tiny_llama, memo_data, tmp_path, monkeypatch, capsys
):
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(memo_data.read_text())
    path = grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, search={"eta": 3})
    grid = yaml.safe_load(open(path))
    grid["base"]["data"]["eval"] = str(evaluation)
    open(path, "w").write(yaml.safe_dump(grid))
    out = tmp_path / "cmp"
    reads: list[tuple[str, bool]] = []
    real = data_module.open_source  # how prepare_splits opens every file it reads

    def watched(p):
        state = out / "search" / "lora" / "state.json"
        reads.append((str(p), state.is_file() and "chosen" in json.loads(state.read_text())))
        return real(p)

    monkeypatch.setattr(data_module, "open_source", watched)
    # killed during the first candidate: the search continues where it stopped
    with pytest.raises(KeyboardInterrupt):
        compare(path, callbacks=[crash_at(1)])
    compare(path, callbacks=[TrainerCallback()])  # in this process, so that the reads are seen
    eval_reads = [chosen for p, chosen in reads if p == str(evaluation)]
    assert eval_reads and all(eval_reads), reads  # read only once the search had chosen
    assert any(p == str(memo_data) and not chosen for p, chosen in reads)  # the candidates did read train

    state = json.loads((out / "search" / "lora" / "state.json").read_text())
    assert state["plan"] == [[2, 3], [6, 1]] and state["spent"] == 3 * 2 + 4 and state["exhaustive"] == 18
    first = state["rungs"][0]["scores"]
    assert set(first) == {"0", "1", "2"} and all(s["steps"] == 2 and s["rows"] == 4 for s in first.values())
    chosen = state["chosen"]
    ranked = sorted(first, key=lambda c: (-first[c]["score"], first[c]["loss"], int(c)))
    assert str(chosen) == ranked[0] and state["rungs"][1]["candidates"] == [chosen]
    lr = state["candidates"][chosen]["lr"]
    # the chosen knobs run as the variant, scored on the eval split (not dev), trained on train minus dev
    run = yaml.safe_load((out / "variants" / "lora" / "config.yaml").read_text())
    assert run["training"]["lr"] == lr and run["eval"]["split"] == "eval" and run["data"]["dev_split"] == 4
    summary = json.loads((out / "variants" / "lora" / "summary.json").read_text())
    assert summary["data"]["train"]["rows"] == 12 and summary["data"]["eval"]["rows"] == 16
    cand = yaml.safe_load((out / "search" / "lora" / "c0" / "config.yaml").read_text())
    assert cand["eval"]["split"] == "dev" and cand["forgetting"]["enabled"] is False

    md = (out / "report.md").read_text()
    assert "## Search: lora" in md and f"it ends with lr = {lr}; 3 candidates, successive halving: 10 " in md
    assert "candidate-steps of the exhaustive grid's 18 (56%)" in md
    assert md.count("| cut after 2 steps |") == 2 and "| chosen |" in md
    assert (out / "plots" / "search_dev_curves.png").stat().st_size > 1000

    # a rerun reads the search back: nothing runs again
    capsys.readouterr()
    compare(path, callbacks=[TrainerCallback()])
    said = capsys.readouterr().out
    assert "search rung" not in said and f"search chose {{'lr': {lr}}}" in said


def test_a_cool_down_scores_each_cut_candidate_after_its_branch_and_counts_its_steps(
    tiny_llama, memo_data, tmp_path, capsys
):
    path = grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, search={"eta": 3, "cooldown": 0.5})
    out = compare(path, callbacks=[TrainerCallback()])
    state = json.loads((out / "search" / "lora" / "state.json").read_text())
    assert state["plan"] == [[2, 3], [6, 1]] and state["cooldown"] == 0.5
    assert all(s["steps"] == 3 for s in state["rungs"][0]["scores"].values())  # cut at 2, scored at 2 + 1
    assert state["spent"] == 3 * (2 + 1) + 4  # the branches count in the compute
    chosen = out / "search" / "lora" / f"c{state['chosen']}"
    assert json.loads((chosen / "summary.json").read_text())["train"]["resumed_from"] == "checkpoint-2"
    assert "a cut candidate scored after a cool-down of 50% of its steps" in (out / "report.md").read_text()
    # its rungs were decided under this plan: a rerun with another cool-down or eta refuses, in one line
    before = (out / "search" / "lora" / "state.json").read_bytes()
    for search in ({"eta": 3}, {"min_steps": 3, "cooldown": 0.5}):  # eta 2 would give the same rungs here
        capsys.readouterr()
        assert main(["compare", grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, search=search)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "this search ran with other candidates or options" in err[0]
        assert (out / "search" / "lora" / "state.json").read_bytes() == before


@pytest.mark.parametrize(
    "space, says",
    [
        ({"lr": []}, "search.lr: an empty list"),
        ({"lr": [0.0, 1e-3]}, "search.lr: a learning rate must be a number above 0"),
        ({"lr": {"log_uniform": [0, 1e-2]}}, "log_uniform needs bounds above 0"),
        ({"reduction_factor": [4, 8]}, "search.reduction_factor: no strategy of this variant (lora) has it"),
        ({"r": [0, 4]}, "search candidate {'r': 0}: "),
        ({"training.seed": [1, 2]}, "never searched"),
    ],
)
def test_a_bad_search_space_is_refused_at_validation_in_one_line(
    tiny_llama, memo_data, tmp_path, capsys, space, says
):
    path = grid_file(tmp_path, tiny_llama, memo_data, [{"name": "lora", "strategy": "lora", "search": space}])
    assert main(["compare", path]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if says in x]
    assert "variant lora" in line and path in line
    assert not (tmp_path / "cmp").exists()  # nothing written


def test_eta_below_two_is_refused(tiny_llama, memo_data, tmp_path, capsys):
    path = grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, search={"eta": 1})
    assert main(["compare", path]) == 2
    assert "search.eta: Input should be greater than or equal to 2" in capsys.readouterr().err


class FailAt(TrainerCallback):
    """Fails the run (an ordinary error, as an OOM would be) when it trains at learning rate ``lr``."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_step_end(self, args, state, control, **kwargs):
        if args.learning_rate == self.lr:
            raise RuntimeError("simulated out of memory")


def test_a_failed_candidate_is_recorded_and_the_search_goes_on(tiny_llama, memo_data, tmp_path):
    path = grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, baseline=False)
    out = compare(path, callbacks=[FailAt(3e-2)])
    state = json.loads((out / "search" / "lora" / "state.json").read_text())
    first = state["rungs"][0]["scores"]
    assert "simulated out of memory" in first["1"]["error"] and state["candidates"][state["chosen"]]["lr"] != 3e-2
    assert json.loads((out / "status.json").read_text()) == {"lora": {"state": "done"}}


class FailEvery(TrainerCallback):
    """Fails every run at its first step, as a full disk would."""

    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("No space left on device")


def test_a_rung_whose_every_candidate_failed_stops_the_search_and_is_retried(tiny_llama, memo_data, tmp_path):
    path = grid_file(tmp_path, tiny_llama, memo_data, SEARCHED, baseline=False)
    with pytest.raises(RunError, match="every candidate of search rung 1 failed .*No space left on device"):
        compare(path, callbacks=[FailEvery()])  # never "chooses" one of three failures
    state = json.loads((tmp_path / "cmp" / "search" / "lora" / "state.json").read_text())
    assert state["rungs"][0]["scores"] == {} and "chosen" not in state
    out = compare(path, callbacks=[TrainerCallback()])  # the disk freed: the same search, retried
    state = json.loads((out / "search" / "lora" / "state.json").read_text())
    assert all("error" not in s for s in state["rungs"][0]["scores"].values()) and state["chosen"] is not None


def test_a_prompt_baseline_searches_shots_selection_and_instruction_on_dev_rows(tiny_llama, memo_data, tmp_path):
    space = {
        "shots": [0, 2],
        "select": ["random", "bm25"],
        "system_prompt": ["Answer briefly.", "Reply: one word"],
    }
    variants = [{"name": "prompting", "strategy": "prompt-only", "search": space}]
    path = grid_file(
        tmp_path, tiny_llama, memo_data, variants, baseline=False, search={"candidates": 8, "min_rows": 2}
    )
    grid = yaml.safe_load(open(path))
    grid["base"]["data"]["dev_split"] = 8
    grid["base"]["training"]["max_length"] = 512
    open(path, "w").write(yaml.safe_dump(grid))
    out = compare(path, callbacks=[TrainerCallback()])
    state = json.loads((out / "search" / "prompting" / "state.json").read_text())
    assert state["unit"] == "dev rows" and state["plan"] == [[2, 8], [6, 2], [8, 1]]
    assert [len(r["scores"]) for r in state["rungs"]] == [8, 2, 1]
    assert all(s["rows"] == r["budget"] for r in state["rungs"] for s in r["scores"].values())
    chosen = state["candidates"][state["chosen"]]
    run = yaml.safe_load((out / "variants" / "prompting" / "config.yaml").read_text())
    (strategy,) = run["strategy"]
    assert {k: strategy[k] for k in chosen} == chosen  # the variant runs with the chosen prompt
    assert run["eval"]["split"] == "eval" and run["eval"]["max_examples"] is None


@pytest.mark.slow
def test_ray_tune_chooses_what_the_local_search_chooses(tiny_llama, memo_data, tmp_path):
    pytest.importorskip("ray", reason="Ray Tune is the optional extra tunelab[ray]")
    space = {"lr": [1e-5, 1e-3, 3e-2, 3e-1]}  # 4 candidates: η 3 gives rungs of 1 step (4), then 6 (1)
    variants = [{"name": "lora", "strategy": {"name": "lora", "r": 4}, "search": space}]
    chosen = {}
    for backend in ("local", "ray"):
        opts = {"candidates": 4, "backend": backend, **({"cpus": 2, "concurrent": 2} if backend == "ray" else {})}
        (tmp_path / backend).mkdir()
        path = grid_file(tmp_path / backend, tiny_llama, memo_data, variants, baseline=False, search=opts)
        # local: in this process (callbacks); ray: a local Ray instance of 2 CPUs, 2 trials at a time
        out = compare(path, callbacks=[TrainerCallback()] if backend == "local" else None)
        state = json.loads((out / "search" / "lora" / "state.json").read_text())
        chosen[backend] = state["candidates"][state["chosen"]]
        assert (
            yaml.safe_load((out / "variants" / "lora" / "config.yaml").read_text())["training"]["lr"]
            == (chosen[backend]["lr"])
        )
    assert chosen["ray"] == chosen["local"]
    assert state["backend"] == "ray" and (tmp_path / "ray" / "cmp" / "search" / "lora" / "ray").is_dir()
    assert all(
        (tmp_path / "ray" / "cmp" / "search" / "lora" / f"c{i}" / "config.yaml").is_file() for i in range(4)
    )


@pytest.mark.slow
def test_a_search_killed_with_sigkill_continues_to_the_same_scores(tiny_llama, memo_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    def grid(where):
        where.mkdir()
        path = grid_file(where, tiny_llama, memo_data, SEARCHED, baseline=False)
        g = yaml.safe_load(open(path))
        g["base"]["training"].update(max_steps=30, save_steps=2)
        open(path, "w").write(yaml.safe_dump(g))
        return path

    killed, whole = grid(tmp_path / "killed"), grid(tmp_path / "whole")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "-q", "compare", killed], stderr=subprocess.PIPE)
    c1 = tmp_path / "killed" / "cmp" / "search" / "lora" / "c1" / "checkpoints"
    deadline = time.time() + 240
    while not list(c1.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.2)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(proc.pid, signal.SIGKILL)  # the comparison dies mid-candidate; its candidate's process stops with it
    proc.wait()
    for pid in children:
        while Path(f"/proc/{pid}").exists() and time.time() < deadline + 60:
            time.sleep(0.2)
    out = compare(killed)  # continues where it stopped
    state = json.loads((out / "search" / "lora" / "state.json").read_text())
    c1_summary = json.loads((c1.parent / "summary.json").read_text())
    assert c1_summary["train"]["resumed_from"] is not None  # c1 went on from its checkpoint
    reference = json.loads((compare(whole) / "search" / "lora" / "state.json").read_text())
    drop = ("wall_s",)
    scores = lambda st: [
        {c: {k: v for k, v in s.items() if k not in drop} for c, s in r["scores"].items()} for r in st["rungs"]
    ]  # noqa: E731, E501
    assert scores(state) == scores(reference) and state["chosen"] == reference["chosen"]
