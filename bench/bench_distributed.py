"""What each `training.distributed` mode holds per process: DDP against FSDP2, 2 processes under torchrun on the
default model, full fine-tuning (the mode where sharding matters most: weights, gradients and AdamW state are
all the size of the model), same data, batch and steps.

    python bench/bench_distributed.py [--steps 10] [--batch-size 2]

Each process reports its peak resident set at the end of training (it includes loading the model) and the
run's steady tokens/s; writes bench/out/distributed.json and prints a table with the FSDP/DDP ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT, ticket_config, ticket_rows

MODES = ("ddp", "fsdp")

DRIVER = """
import json, os, resource, sys, time
from transformers import TrainerCallback
from tunelab.run import train

class Peak(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            self.t2, self.n2 = time.perf_counter(), state.num_input_tokens_seen
    def on_train_end(self, args, state, control, **kw):
        rank = os.environ["RANK"]
        steady = (state.num_input_tokens_seen - self.n2) / (time.perf_counter() - self.t2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(sys.argv[2] + f".rank{rank}.json", "w") as f:
            json.dump({"peak_mb": round(peak), "steady_tokens_per_s": round(steady, 1)}, f)

train(sys.argv[1], callbacks=[Peak()])
"""


def run(mode: str, steps: int, bs: int, work: Path) -> dict:
    from tunelab.config import DEFAULT_MODEL
    from tunelab.demo import write_jsonl
    from tunelab.models import resolve_model

    data = write_jsonl(ticket_rows(steps * bs * 2), work / "train.jsonl")
    model = str(resolve_model(DEFAULT_MODEL))
    cfg = ticket_config(model, data, "full", work / mode, steps, bs, distributed=mode)
    cfg["forgetting"] = {"enabled": False}
    (work / f"{mode}.json").write_text(json.dumps(cfg))
    (work / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613"]
    proc = subprocess.run(
        [*cmd, str(work / "driver.py"), str(work / f"{mode}.json"), str(work / mode)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    ranks = [json.loads((work / f"{mode}.rank{r}.json").read_text()) for r in (0, 1)]
    return {
        "peak_mb_per_process": [r["peak_mb"] for r in ranks],
        "steady_tokens_per_s": ranks[0]["steady_tokens_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        results = {m: run(m, a.steps, a.batch_size, Path(d)) for m in MODES}
    ddp, fsdp = results["ddp"], results["fsdp"]
    results["fsdp_vs_ddp"] = {
        "peak": round(max(fsdp["peak_mb_per_process"]) / max(ddp["peak_mb_per_process"]), 2),
        "tokens_per_s": round(fsdp["steady_tokens_per_s"] / ddp["steady_tokens_per_s"], 2),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(results, indent=2))
    print(f"{'mode':6} {'peak MB per process':>22} {'steady tokens/s':>16}")
    for m in MODES:
        r = results[m]
        print(f"{m:6} {str(r['peak_mb_per_process']):>22} {r['steady_tokens_per_s']:>16}")
    ratio = results["fsdp_vs_ddp"]
    print(f"fsdp / ddp: peak x{ratio['peak']}, tokens/s x{ratio['tokens_per_s']}")


if __name__ == "__main__":
    main()
