"""A fair search over each strategy's own knobs: **successive halving** on the dev split.

A variant of a grid may carry a ``search:`` space over its knobs::

    - name: lora
      strategy: {name: lora, r: 16}
      search: {lr: {log_uniform: [1.0e-5, 1.0e-2]}, r: [8, 16, 32]}

Its knobs and the candidates they make are tunelab.lab.space.

The search (Jamieson & Talwalkar 2016; Li et al. 2018, "Hyperband", for η): every candidate trains ``r₀``
steps, the best ``1/η`` by the dev metric (the primary metric; candidates the dev split cannot tell apart go
by dev loss: :func:`rank`) **continue from their checkpoints** to ``η·r₀``, and so on until one is left, which
trains to the comparison's budget ``R`` (``training.max_steps``). ``r₀ = R / η^⌈log_η N⌉`` (at least
``search.min_steps``), so the first rung costs about one full run, as every later one does. The learning-rate
schedule's horizon is always ``R``: a candidate cut at step ``r`` has had exactly the first ``r`` steps of the
run it would have had, so continuing equals having trained longer from the start (a test checks the weights
bit for bit). Every searched variant gets the same number of candidates (``search.candidates``) and so the
same compute.

Early rungs favour low learning rates (the short-horizon bias): at a cut the schedule is still high, and a
high rate's progress does not show yet. ``search.cooldown`` scores a cut candidate after a short branch whose
rate falls to zero (as a warmup-stable-decay run is read at any point), the branch counted in the compute
and never continued (:func:`stop_at`).

Prompt baselines (no training) are halved on the number of dev rows scored instead of steps: ``m₀`` rows,
then ``η·m₀``, up to the whole dev split.

Candidates are scored on the dev split (``eval.split: dev``; the eval file is never opened) without
forgetting measured. The chosen knobs then run as the variant itself, once per seed, scored on the eval split.

Layout: ``<comparison>/search/<variant>/<candidate>/`` (an ordinary run dir) and
``<comparison>/search/<variant>/state.json`` (the candidates, each rung's scores, the choice). Running the
comparison again continues: scored rungs are kept, a candidate killed mid-rung resumes from its checkpoint,
a failed candidate is recorded (it ranks last) and the search goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field

from tunelab.config import RunConfig
from tunelab.errors import RunError, first_line
from tunelab.integrity import read_json
from tunelab.lab.space import Candidate
from tunelab.rundir import CHECKPOINTS, MARKER, PREDICTIONS, SUMMARY
from tunelab.runtime import write_json_atomic
from tunelab.schema import StrictModel

SEARCH, STATE = "search", "state.json"


class SearchOptions(StrictModel):
    eta: int = Field(
        3, ge=2, description="Keep the best 1/eta of the candidates at each rung (successive halving)."
    )
    candidates: int = Field(
        6,
        ge=1,
        description="Candidates per searched variant: every strategy gets the same number, so the same compute.",
    )
    min_steps: int = Field(1, ge=1, description="The least steps a candidate trains before its first cut.")
    min_rows: int = Field(4, ge=1, description="The least dev rows a prompt candidate is scored on before a cut.")
    cooldown: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Score a cut candidate after this share of its steps more, its learning rate falling to zero "
        "(a branch: the next rung continues from the cut). Against the short-horizon bias of early rungs.",
    )
    seed: int = Field(0, description="Seed of the draw when a space has more points than `candidates`.")
    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: candidates one process at a time, here (no extra dependency). ray: Ray Tune trials "
        "under its ASHA scheduler, in parallel, here or on a Ray cluster (pip install 'tunelab[ray]').",
    )
    address: str | None = Field(
        None, description="ray: the cluster to join (`auto`, or ray://HOST:10001); default: start one here."
    )
    cpus: int | None = Field(None, ge=1, description="ray: CPUs of the instance started here (default: all).")
    cpus_per_trial: float = Field(1.0, gt=0, description="ray: CPUs each candidate holds.")
    gpus_per_trial: float = Field(0.0, ge=0, description="ray: GPUs each candidate holds (a share, e.g. 0.5).")
    concurrent: int | None = Field(
        None, ge=1, description="ray: candidates at once (default: as many as the resources allow)."
    )

    def plan(self, n: int, budget: int, trains: bool) -> tuple[list[tuple[int, int]], float]:
        """``n`` candidates' rungs over ``budget`` (steps, or dev rows for a variant that does not train) and
        the cool-down share that applies (none without training): decided here, once, for every backend."""
        plan = rungs(n, budget, self.eta, self.min_steps if trains else self.min_rows)
        return plan, self.cooldown if trains else 0.0


def rungs(n: int, budget: int, eta: int, least: int) -> list[tuple[int, int]]:
    """(budget, candidates) per rung: ``n`` candidates at ``r₀``, ``n // η`` (at least 1) at ``η·r₀``, ...;
    the last one alone at the full ``budget``."""
    depth = math.ceil(math.log(n, eta) - 1e-9) if n > 1 else 0
    r0 = min(budget, max(least, math.ceil(budget / eta**depth)))
    plan, r = [], r0
    while n > 1 and r < budget:
        plan.append((r, n))
        n, r = max(1, n // eta), min(budget, r * eta)
    plan.append((budget, n))
    return plan


def cooldown_steps(r: int, budget: int, share: float) -> int:
    """The steps of the cool-down branch a candidate cut at step ``r`` is scored after (none at the budget)."""
    return max(1, round(share * r)) if r < budget and share > 0 else 0


def compute(plan: list[tuple[int, int]], cooldown: float = 0.0) -> int:
    """Steps (or rows) the plan spends, each candidate continuing from where it was cut (its cool-down
    branches counted)."""
    spent, before, budget = 0, 0, plan[-1][0]
    for r, n in plan:
        spent += n * (r - before + cooldown_steps(r, budget, cooldown))
        before = r
    return spent


# ----------------------------------------------------------------------------- running one variant's search


class Cut(NamedTuple):
    """Where a rung cuts a candidate: after optimizer step ``step`` (its checkpoint, which the next rung
    continues from), then ``cooldown`` steps more whose learning rate falls linearly to zero from the
    schedule's, no checkpoint written, and the candidate is scored there."""

    step: int
    cooldown: int = 0


#: runs one candidate: (config, resume, cut, overwrite) -> its error line or None
Runner = Callable[[RunConfig, bool, Cut | None, bool], str | None]


def _dev_result(run_dir: Path) -> dict[str, Any] | None:
    """A candidate's dev scores as its last rung left them: steps trained, metric, loss; None before any."""
    if not (run_dir / SUMMARY).is_file():
        return None
    s = read_json(run_dir / SUMMARY)
    ev = s.get("eval") or {}
    metric = ev.get("primary")
    return {
        "steps": (s.get("train") or {}).get("steps", 0),
        "rows": ev.get("examples"),
        "metric": metric,
        "score": ev.get(metric) if metric else None,
        "loss": ev.get("loss"),
        "wall_s": s.get("wall_time_s"),
    }


def search_variant(
    out: Path,
    name: str,
    cands: list[Candidate],
    make: Callable[[Candidate, dict], RunConfig],
    opts: SearchOptions,
    budget: int,
    trains: bool,
    runner: Runner,
) -> Candidate:
    """Run (or continue) variant ``name``'s search; returns the chosen candidate. ``make(candidate, extra)``
    builds a candidate's config (its run dir under ``search/<name>/``); ``extra`` adds ``eval.max_examples``
    for a prompt rung. ``budget``: steps, or dev rows when the variant does not train."""
    home = out / SEARCH / name
    home.mkdir(parents=True, exist_ok=True)
    path = home / STATE
    state = read_json(path) if path.is_file() else {}
    plan, cooldown = opts.plan(len(cands), budget, trains)
    same_search(path, state, cands, plan, cooldown)
    state.update(candidates=[c.knobs for c in cands], unit="steps" if trains else "dev rows", plan=plan)
    if cooldown:
        state["cooldown"] = cooldown
    state.setdefault("rungs", [])
    alive = list(range(len(cands)))
    for i, (r, _) in enumerate(plan):
        if len(state["rungs"]) <= i:
            state["rungs"].append({"budget": r, "candidates": alive, "scores": {}})
        rung = state["rungs"][i]
        for c in alive:
            if str(c) in rung["scores"]:
                continue
            rung["scores"][str(c)] = run_candidate(
                home / cands[c].id, cands[c], make, r, budget, trains, runner, cooldown
            )
            write_json_atomic(path, state)
            tag = rung["scores"][str(c)]
            said = tag.get("error") or f"{tag['metric']} {tag['score']:.3f}, loss {tag['loss']:.4f}"
            print(f"compare: {name}: search rung {i + 1}/{len(plan)} ({r} {state['unit']}): {cands[c].id} "
                  f"{cands[c].knobs}: {said}", flush=True)  # fmt: skip
        failed = [rung["scores"][str(c)].get("error") for c in alive]
        if "kept" not in rung and all(failed):  # nothing to choose from: a full disk, a broken setup
            for c in alive:  # forgotten, so that the next run tries them again
                del rung["scores"][str(c)]
            write_json_atomic(path, state)
            raise RunError(
                f"{name}: every candidate of search rung {i + 1} failed (first: {failed[0]}); run the comparison "
                "again to retry them"
            )
        if "kept" not in rung:  # decided once, from the rung's dev answers (a rerun reads it back)
            keep = plan[i + 1][1] if i + 1 < len(plan) else 1
            rung["kept"] = rank(home, cands, rung["scores"], alive)[:keep]
            write_json_atomic(path, state)
        alive = rung["kept"]
    state["chosen"] = alive[0]
    state["spent"] = compute(plan, cooldown)
    state["exhaustive"] = len(cands) * budget
    write_json_atomic(path, state)
    return cands[alive[0]]


def same_search(path: Path, state: dict, cands: list[Candidate], plan: list[tuple[int, int]], cooldown: float):
    """Refuse to continue a search whose recorded rungs were decided with other candidates or another plan
    (eta, min_steps, min_rows, cooldown): reusing them would mix two searches."""
    if state and (
        state.get("candidates") != [c.knobs for c in cands]
        or [tuple(r) for r in state.get("plan", [])] != plan
        or state.get("cooldown", 0.0) != cooldown
    ):
        raise RunError(
            f"{path}: this search ran with other candidates or options (eta, min_steps, min_rows, cooldown); give "
            "the changed variant a new name, or choose a new output_dir"
        )


def rank(home: Path, cands: list[Candidate], scores: dict[str, dict], alive: list[int]) -> list[int]:
    """The candidates of a rung, best first, by the dev metric **where the dev split can tell them apart**:
    the best one and every candidate whose paired-bootstrap difference to it (over the dev rows,
    tunelab.lab.stats) reaches 0 are tied, and a tie goes by dev loss (then order); the rest are ranked the
    same way. On a small dev split early in training, a row or two of exact match is noise while the loss is
    not. A failed candidate ranks last; without its answers on disk, the metric alone decides."""
    from tunelab.evaluate import read_predictions
    from tunelab.lab import stats
    from tunelab.metrics import row_stats

    def loss(c: int) -> float:
        value = scores[str(c)].get("loss")
        return value if value is not None else math.inf

    ok = [c for c in alive if "error" not in scores[str(c)] and scores[str(c)].get("score") is not None]
    failed = [c for c in alive if c not in ok]
    ok.sort(key=lambda c: (-scores[str(c)]["score"], loss(c), c))
    metric = scores[str(ok[0])]["metric"] if ok else None
    rows = {}
    for c in ok:
        answers = home / cands[c].id / PREDICTIONS / "dev.jsonl"
        if not answers.is_file():
            return ok + failed
        head, refs, preds = read_predictions(answers)
        rows[str(c)] = row_stats(metric, preds, refs, head.get("labels"))[None]
    order: list[int] = []
    while len(order) < len(ok):
        left = [c for c in ok if c not in order]
        tied = {int(x) for x in stats.paired_bootstrap({str(c): rows[str(c)] for c in left}, metric).tied}
        order += sorted(tied, key=lambda c: (loss(c), -scores[str(c)]["score"], c))
    return order + failed


def run_candidate(
    run_dir: Path, cand: Candidate, make, r: int, budget: int, trains: bool, runner: Runner, cooldown: float = 0.0
) -> dict[str, Any]:
    """Train (or continue) one candidate to ``r`` steps (scored after its cool-down branch, ``cooldown`` of
    ``r`` more steps: :meth:`SearchOptions.plan` gives none without training), or score it on ``r`` dev rows;
    its dev result."""
    cool = cooldown_steps(r, budget, cooldown)
    done = _dev_result(run_dir) if trains else None
    if done is not None and done["steps"] == r + cool:  # it finished this rung before the comparison stopped
        return done
    if trains:
        cfg = make(cand, {})
        resume = (run_dir / MARKER).is_file() and (run_dir / CHECKPOINTS).is_dir()
        error = runner(cfg, resume, Cut(r, cool) if r < budget else None, False)
    else:
        cfg = make(cand, {"eval": {"max_examples": r}})
        error = runner(cfg, False, None, True)  # a fresh scoring at each rung: more rows, nothing trained
    if error is not None:
        return {"error": error}
    try:
        result = _dev_result(run_dir)
    except RunError as e:
        return {"error": first_line(e)}
    return result if result is not None else {"error": f"{run_dir}: no summary after the run"}


def stop_at(step: int, cooldown: int = 0):
    """A Trainer callback that cuts training after optimizer step ``step`` and saves a checkpoint there (the
    schedule keeps its horizon: the run is cut, not shortened); with a ``cooldown``, it trains that many steps
    more as a branch, no checkpoint written, the learning rate falling linearly to zero from the schedule's,
    and stops there (the weights scored)."""
    from transformers import TrainerCallback

    end = step + cooldown

    class StopAt(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # resumed at the end: no step past it
            if state.global_step >= end:
                control.should_training_stop = True
            return control

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            j = state.global_step - step  # 0 for the branch's first step
            if 0 <= j < cooldown and optimizer is not None:  # the scheduler set this step's rates: scale them
                for group in optimizer.param_groups:
                    group["lr"] *= (cooldown - j) / (cooldown + 1)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_save = True  # the cut: the next rung continues from here
            elif state.global_step > step:
                control.should_save = False  # the branch is scored, never continued
            if state.global_step >= end:
                control.should_training_stop = True
            return control

    return StopAt()


def dev_size(cfg: RunConfig) -> int:
    """How many rows the dev split of ``cfg.data`` has (a prompt search's budget, in rows)."""
    from tunelab.data import dev_rows
    from tunelab.sources import open_source

    data = cfg.data
    if data.dev:
        return open_source(data.dev).n
    n = open_source(data.train).n
    if data.eval_split:
        n -= max(1, round(n * data.eval_split))
    return dev_rows(data, n, data.train)


def read_searches(out: Path) -> dict[str, dict[str, Any]]:
    """Each searched variant's state (see :func:`search_variant`), by variant; {} without a search."""
    home = out / SEARCH
    if not home.is_dir():
        return {}
    found = {}
    for path in sorted(home.glob(f"*/{STATE}")):
        try:
            found[path.parent.name] = read_json(path)
        except RunError:
            continue  # a damaged state: the report shows the variant's rows without its search
    return found
