"""``tunelab compare grid.yaml``: several strategies on the same data, seed and budget, one after the other,
in one comparison directory, and what each one cost and gave.

A grid is a base run config plus named variants::

    base: {model: ..., data: {train: ..., eval: ...}, training: {max_steps: 60, lr: 1e-3}}
    variants:
      - {name: zero-shot, strategy: {name: prompt-only}}
      - {name: lora, strategy: {name: lora, r: 16}}
      - {name: full, strategy: full, set: [training.lr=5e-5]}
      - {name: full+ewc, strategy: [full, {name: ewc, lam: 1000}], set: [training.lr=5e-5]}
    output_dir: runs/compare
    report: {within: 5}

A zero-shot prompt baseline (``prompt-only``: the untouched model, no training) is added as the first row
unless a variant is already a prompt baseline or the grid says ``baseline: false``.

Each variant is the base with the variant's keys merged in (mappings merge, other values replace) and its
``set`` overrides applied, exactly like ``tunelab train --set``. A variant may change strategies, mode,
learning rates and any other option, but not what makes the comparison fair: the data (``data``,
``tasks``), ``training.seed`` and the budget (``training.max_steps`` / ``training.epochs``) belong to the
base; a variant that sets them is refused, naming it. Every variant's config is validated before the first
one runs.

Layout: ``<dir>/.tunelab-compare`` (the marker: a comparison only starts in a new or empty directory and
continues only in one that holds the marker, so no file of the user's is overwritten), ``<dir>/grid.yaml``
(the grid as given), ``<dir>/variants/<name>/`` (an ordinary run dir) and
``<dir>/status.json`` (each variant's state: done, failed with its error line, or not run yet). Rerunning
the same command continues: finished variants are skipped, a variant killed mid-run resumes from its last
checkpoint (``--resume``), a failed one is tried again. A variant that fails is recorded with its error
and the others still run. Each variant trains in a fresh process, so that its peak memory and speed are its
own and a crash ends only that variant (with ``callbacks``, which cannot cross a process boundary, they run
in this process).
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import RunError, Unfinished, first_line
from tunelab.integrity import read_json
from tunelab.lab.grid import (
    GRID,
    STATUS,
    VARIANTS,
    Grid,
    build,
    candidate_config,
    load_grid,
    read_grid,
    read_status,
    trains,
    variant_dict,
)
from tunelab.lab.report import write_report
from tunelab.lab.runner import run_here, run_in_child
from tunelab.lab.search import Cut, dev_size, search_variant
from tunelab.lab.space import candidates
from tunelab.rundir import MARKER, SUMMARY
from tunelab.runtime import write_json_atomic

MARK = ".tunelab-compare"  #: proves a directory is a comparison tunelab wrote (and may continue)


def _state(run_dir: Path) -> str:
    if (run_dir / SUMMARY).is_file():
        return "done"
    if (run_dir / MARKER).is_file():
        return "interrupted"
    return "new"


def search_variant_runs(out: Path, grid: Grid, v, configs: dict, callbacks: list | None = None) -> dict:
    """Search variant ``v``'s knobs (or read the search back once its runs are done): its runs' configs with
    the chosen knobs."""
    keys = grid.runs()[v.name]
    first = configs[keys[0][1]]
    cands = candidates(v.search, grid.search, first)
    learns = trains(first)
    budget = first.training.max_steps if learns else dev_size(first)

    def runner(cfg, resume: bool, stop: Cut | None, overwrite: bool) -> str | None:
        if callbacks:
            return run_here(cfg, resume, callbacks, stop, overwrite)
        return run_in_child(cfg, resume, stop, overwrite)

    def make(cand, extra: dict):
        return candidate_config(grid, v, cand, extra)

    if grid.search.backend == "ray":
        from tunelab.lab.raytune import search_with_ray

        chosen = search_with_ray(out, v.name, cands, make, grid.search, budget, learns)
    else:
        chosen = search_variant(out, v.name, cands, make, grid.search, budget, learns, runner)
    print(f"compare: {v.name}: search chose {chosen.knobs}", flush=True)
    cfg, _ = variant_dict(grid, v)
    return {key: build(grid, v, cfg, VARIANTS, key, seed, chosen.sets) for seed, key in keys}


def _same_grid(old: Grid, new: Grid, status: dict[str, dict], out: Path) -> None:
    """Continuing a comparison: the base and every variant that has run must be as they were, or its rows
    would mix two setups. New variants may be added; report options may change."""
    if old.base != new.base:
        raise RunError(
            f"{out} was run with a different base config; continuing would compare runs on different setups: "
            "restore the base, or choose a new output_dir"
        )
    if (old.seeds is None) != (new.seeds is None) and status:
        raise RunError(
            f"{out} was run {'without' if old.seeds is None else 'with'} seeds; runs with and without seeds are "
            "laid out differently: keep `seeds` as it was (more seeds may be added), or choose a new output_dir"
        )
    before, ran = {v.name: v for v in old.variants}, new.runs()
    changed = [
        v.name
        for v in new.variants
        if v.name in before
        and v.model_dump() != before[v.name].model_dump()
        and any(key in status for _, key in ran[v.name])
    ]
    if changed:
        raise RunError(
            f"{out}: variant(s) {', '.join(changed)} changed since they ran; give a changed variant a new name, "
            "or choose a new output_dir"
        )


def check_finished(out: Path) -> None:
    """Raise :class:`Unfinished` (exit code 1) with one line naming each variant of the comparison in ``out``
    that gave no result and where its error is; nothing when every variant gave one."""
    problems = read_json(out / "recommendation.json").get("unfinished") or {}
    if problems:
        listed = "; ".join(f"{name} ({why})" for name, why in problems.items())
        raise Unfinished(
            f"{len(problems)} variant(s) gave no result: {listed}. Errors are in {out}/status.json and "
            f"{out}/report.md; `tunelab compare` on the same grid retries them"
        )


def claim(out: Path) -> None:
    """Make sure ``out`` is new, empty or a comparison tunelab wrote, and mark it as one."""
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir {out} is a file; a comparison writes a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise RunError(
            f"output_dir {out} holds files tunelab did not write (no {MARK}); a comparison only continues in "
            "its own directory: choose a new or empty one"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("a tunelab comparison directory: tunelab compare writes here\n")


def compare(
    path: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    output_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    model: str | None = None,
    seeds: int | None = None,
    search: bool = False,
    task: str | None = None,
    callbacks: list | None = None,
) -> Path:
    """Run (or continue) every variant of the grid at ``path``, or of a ready-made ``preset``
    (:mod:`tunelab.lab.presets`: its data and grid are written under ``output_dir/data``, ``steps`` sets its
    budget, ``model`` its model, ``seeds`` its runs per row, ``search`` a search of each row's knobs and
    ``task`` its data); then write the report. Returns the comparison directory. Mirrors ``tunelab compare``."""
    if (path is None) == (preset is None):
        raise RunError("give a grid file or a preset (--preset), not both or neither")
    if preset is not None:
        from tunelab.lab.presets import PRESETS, write_preset

        if preset not in PRESETS:
            raise RunError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        out = Path(output_dir or f"runs/{preset}")
        claim(out)
        (out / "data").mkdir(exist_ok=True)
        try:
            options = {k: v for k, v in (("seeds", seeds), ("search", search or None), ("task", task)) if v}
            path = write_preset(preset, out, steps, model, **options)
        except ValueError as e:
            raise RunError(f"--preset {preset}: {first_line(e)}") from None
    elif any(x is not None for x in (output_dir, steps, model, seeds, task)) or search:
        raise RunError(
            "--output-dir, --steps, --model, --seeds, --search and --task go with --preset; a grid sets its own"
        )
    grid, configs = load_grid(path)
    out = Path(grid.output_dir)
    status = read_status(out) if out.is_dir() else {}
    if (out / GRID).is_file():
        _same_grid(read_grid(out), grid, status, out)
    claim(out)
    (out / GRID).write_text(Path(path).read_text(encoding="utf-8"))
    status_file = out / STATUS
    for v in grid.variants:
        if v.search is not None:
            configs.update(search_variant_runs(out, grid, v, configs, callbacks))
    for name, cfg in configs.items():  # name: the run's key, the variant's name or <name>/seed-<s>
        run_dir = out / VARIANTS / name
        state = _state(run_dir)
        if state == "done":
            print(f"compare: {name}: done earlier, skipped", flush=True)
            status[name] = {"state": "done"}
            continue
        print(f"compare: {name}: {'resuming' if state == 'interrupted' else 'running'}", flush=True)
        resume = state == "interrupted"
        try:
            error = run_here(cfg, resume, callbacks) if callbacks else run_in_child(cfg, resume)
        except KeyboardInterrupt:
            status[name] = {"state": "interrupted"}
            write_json_atomic(status_file, status)
            raise
        if error is None:
            status[name] = {"state": "done"}
        else:  # one variant's failure is a result, not the end of the comparison
            status[name] = {"state": "failed", "error": error}
            print(f"compare: {name}: failed: {error}", flush=True)
        write_json_atomic(status_file, status)
    write_json_atomic(status_file, status)
    write_report(out, within=grid.report.within)
    return out
