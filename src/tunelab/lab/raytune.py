"""``search.backend: ray``: a variant's candidates as Ray Tune trials under its ASHA scheduler (Li et al.
2020, "A System for Massively Parallel Hyperparameter Tuning"), so that they run in parallel, on one machine
or on a Ray cluster (``search.address``). Install with ``pip install tunelab[ray]``.

Each trial is the same as a local candidate: an ordinary tunelab run dir under
``<comparison>/search/<variant>/<candidate>/``, trained (or scored, for a prompt baseline) to each rung's
budget from its own checkpoint and scored on the dev split; it reports ``dev`` (the primary metric) at every
rung and ASHA stops the ones below the top ``1/η`` of what that rung has seen. ASHA is asynchronous: a trial
that reaches a rung early may continue where synchronous halving would have cut it, so it can spend a little
more; the choice is the best dev score among the trials that reached the full budget (ties: dev loss, then
order). The search's ``state.json`` has the local backend's layout, so the report reads both alike.

Ray keeps its own session files (logs, sockets) in its temp dir (``/tmp/ray`` unless the cluster says
otherwise); its trial records go under ``<comparison>/search/<variant>/ray/``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tunelab.errors import RunError
from tunelab.lab.search import (
    SEARCH,
    STATE,
    Candidate,
    SearchOptions,
    compute,
    cooldown_steps,
    run_candidate,
    same_search,
)  # fmt: skip
from tunelab.runtime import write_json_atomic


def _runner(cfg, resume: bool, stop: int | None, overwrite: bool) -> str | None:
    from tunelab.lab.runner import run_here

    return run_here(cfg, resume, None, stop, overwrite)


def search_with_ray(
    out: Path, name: str, cands: list[Candidate], make, opts: SearchOptions, budget: int, trains: bool
) -> Candidate:
    """Run variant ``name``'s search as Ray Tune trials (see the module's docstring); the chosen candidate."""
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        raise RunError("search.backend: ray needs Ray Tune: pip install 'tunelab[ray]'") from None
    home = (out / SEARCH / name).resolve()
    home.mkdir(parents=True, exist_ok=True)
    plan, cooldown = opts.plan(len(cands), budget, trains)
    budgets = [r for r, _ in plan]
    done = _read_state(home)
    same_search(home / STATE, done, cands, plan, cooldown)
    if done.get("chosen") is not None:
        return cands[done["chosen"]]  # searched before: the choice stands
    cwd = os.getcwd()

    def trial(params: dict[str, Any]) -> None:
        os.chdir(cwd)  # the grid's relative paths (data, model) are the comparison's, not the trial dir's
        c = cands[params["i"]]
        for r in budgets:
            got = run_candidate(home / c.id, c, make, r, budget, trains, _runner, cooldown)
            if "error" in got:
                tune.report({"budget": r, "dev": -math.inf, "loss": math.inf, "error": got["error"]})
                return
            tune.report({"budget": r, "dev": got["score"], "loss": got["loss"], "wall_s": got["wall_s"]})

    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address, num_cpus=None if opts.address else opts.cpus, log_to_driver=False)
    try:
        resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(trial, resources),
            param_space={"i": tune.grid_search(list(range(len(cands))))},
            tune_config=tune.TuneConfig(
                scheduler=ASHAScheduler(
                    time_attr="budget",
                    metric="dev",
                    mode="max",
                    max_t=budget,
                    grace_period=budgets[0],
                    reduction_factor=opts.eta,
                ),  # fmt: skip
                max_concurrent_trials=opts.concurrent,
            ),
            run_config=tune.RunConfig(name="ray", storage_path=str(home), verbose=0),
        )
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    history: dict[int, list[dict]] = {}
    for res in results:
        i = res.config["i"]
        df = res.metrics_dataframe
        keep = [c for c in ("budget", "dev", "loss", "wall_s", "error") if df is not None and c in df]
        history[i] = [] if df is None else df[keep].to_dict("records")
        if res.error is not None and not history[i]:
            history[i] = [{"budget": budgets[0], "error": str(res.error).splitlines()[0]}]
    return _record(home, cands, plan, history, budget, trains, cooldown)


def _read_state(home: Path) -> dict:
    from tunelab.integrity import read_json

    return read_json(home / STATE) if (home / STATE).is_file() else {}


def _record(home: Path, cands: list[Candidate], plan, history: dict[int, list[dict]], budget: int, trains: bool,
            cooldown: float):  # fmt: skip
    """The trials' reports as the local backend's ``state.json`` (rungs of scores), and the choice."""
    state: dict[str, Any] = {"backend": "ray", "candidates": [c.knobs for c in cands], "plan": plan, "rungs": []}
    state["unit"] = "steps" if trains else "dev rows"
    for r, _ in plan:
        scores = {}
        for i, reports in history.items():
            for rep in reports:
                if rep.get("budget") == r:
                    err = rep.get("error")
                    scores[str(i)] = (
                        {"error": err}
                        if isinstance(err, str) and err
                        else {"steps": r, "score": rep["dev"], "loss": rep["loss"], "wall_s": rep.get("wall_s")}
                    )
        state["rungs"].append({"budget": r, "candidates": sorted(int(i) for i in scores), "scores": scores})
    finals = {int(i): s for i, s in state["rungs"][-1]["scores"].items() if "error" not in s}
    if not finals:
        raise RunError(f"{home}: no candidate of the search reached the full budget; see {home / 'ray'}")
    chosen = min(finals, key=lambda i: (-finals[i]["score"], finals[i]["loss"], i))
    reached = [max((rep.get("budget", 0) for rep in reps), default=0) for reps in history.values()]
    branches = sum(cooldown_steps(r, budget, cooldown) for top in reached for r, _ in plan if r <= top)
    state.update(chosen=chosen, spent=sum(reached) + branches, exhaustive=len(cands) * budget)
    state.update(planned=compute(plan, cooldown), **({"cooldown": cooldown} if cooldown else {}))
    write_json_atomic(home / STATE, state)
    return cands[chosen]
