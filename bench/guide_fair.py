"""The guide re-measured fairly (docs/results.md): every row's learning rate (and the few-shot row's prompt)
chosen by successive halving on a dev split, every row trained once per seed, and the guide's other use
cases (translation, summaries) beside the demo's triage.

    python bench/guide_fair.py --out bench/out/guide-fair      # hours on 2 CPU cores: docs/results.md
    python bench/guide_table.py bench/out/guide-fair/triage     # the table of each task

Each task is one ordinary ``tunelab compare`` of the guide preset (``--seeds --search``), its grid written
under ``<out>/<task>/data/guide.yaml``. To save time, the steps and the eval set shrink (``--steps``,
``--eval-rows``), and the new tasks run a few rows only (``--rows``: the prompt baselines, full fine-tuning
and LoRA); the regularizers, hybrids, multi-task, continual and distillation rows are about forgetting and
transfer, which triage measures. Wall times go to ``<out>/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunelab.lab.compare import claim
from tunelab.lab.presets import write_preset

SINGLE = "zero-shot,4-shot,full,lora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/guide-fair")
    ap.add_argument("--tasks", default="triage,translation,summaries")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=24)
    ap.add_argument("--rows", help=f"the rows to run (default: all of them on triage, {SINGLE} on the others)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    tasks = a.tasks.split(",")
    for task in tasks:
        where = out / task
        claim(where)
        (where / "data").mkdir(exist_ok=True)
        grid = write_preset(
            "guide", where, steps=a.steps, seeds=a.seeds, search=True, task=task, eval_rows=a.eval_rows
        )
        rows = a.rows or (None if task == "triage" else SINGLE)
        if rows:
            spec = yaml.safe_load(grid.read_text())
            keep = set(rows.split(","))
            spec["variants"] = [v for v in spec["variants"] if v["name"] in keep]
            grid.write_text(yaml.safe_dump(spec, sort_keys=False, width=110))
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from tunelab.cli import main; sys.exit(main())",
                "compare",
                str(grid),
            ],
            check=True,
        )
        timings[task] = {"wall_s": round(time.perf_counter() - start, 1), "steps": a.steps, "seeds": a.seeds}
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"guide_fair: {task}: {timings[task]['wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
