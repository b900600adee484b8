"""What every benchmark here shares: one process per side (so peak memory is that side's own), the same
tokens/s definition, the same generated data."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def peak_mb() -> float:
    """The process's peak: max allocated on CUDA, max resident set (KiB on Linux) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ticket_rows(n: int) -> list[dict]:
    from tunelab.demo import make_tickets

    return make_tickets(n, seed=1)


#: the three data shapes the benches train on, and a max length that holds each shape's rows whole
SHAPES = ("tickets", "short", "long")
MAX_LEN = {"tickets": 192, "short": 128, "long": 640}


def shape_rows(shape: str, n: int) -> list[dict]:
    """``n`` prompt/completion rows of one shape, with the default model's chat template: ``tickets`` (the
    demo's support tickets, ~120 tokens a row), ``short`` (a sentence to translate, ~55 tokens), ``long``
    (the last email of a thread of six to summarise, ~540 tokens)."""
    from tunelab.builtin_tasks import make_summaries, make_translation

    if shape == "tickets":
        return ticket_rows(n)
    if shape == "short":
        return make_translation(n, seed=1)
    if shape == "long":
        emails = make_summaries(6 * n, seed=1)
        head = (
            "Here is an email thread. Summarise its last email in one sentence: who, what went wrong, "
            "what they want."
        )
        out = []
        for i in range(n):
            thread = [e["prompt"].split("\n\n", 1)[1] for e in emails[6 * i : 6 * i + 6]]
            out.append(
                {"prompt": head + "\n\n" + "\n\n".join(thread), "completion": emails[6 * i + 5]["completion"]}
            )
        return out
    raise ValueError(f"shape {shape!r}: one of {', '.join(SHAPES)}")


def ticket_config(model_dir: str, data: Path, strategy, out: Path, steps: int, bs: int, **training) -> dict:
    """A run config over generated tickets: ``steps`` optimizer steps of ``bs`` rows, max length 192, no
    checkpoint within the run."""
    t = {"max_steps": steps, "batch_size": bs, "lr": 1e-5, "max_length": 192, "save_steps": 10 * steps}
    t.update(logging_steps=5, **training)
    return {
        "model": model_dir,
        "data": {"train": str(data)},
        "strategy": strategy,
        "training": t,
        "output_dir": str(out),
    }


class StepClock:
    """A Trainer callback (duck-typed, so this module imports no transformers): wall time and tokens seen at
    the end of each step, so the first step (compiling, warm-up) can be told from the steady state."""

    def __init__(self) -> None:
        self.t0, self.marks = 0.0, []

    def __getattr__(self, name):  # every other Trainer event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    def figures(self, compiled_at: int | None = None) -> dict:
        """First step's wall time, and tokens/s over steps 2..N, leaving out step ``compiled_at`` (the step
        that compiled, where ``compile: auto`` turned compiling on after its eager steps)."""
        (t1, n1), (tn, nn) = self.marks[0], self.marks[-1]
        seconds, tokens = tn - t1, nn - n1
        if compiled_at is not None and 2 <= compiled_at <= len(self.marks):
            (ta, na), (tb, nb) = self.marks[compiled_at - 2], self.marks[compiled_at - 1]
            seconds, tokens = seconds - (tb - ta), tokens - (nb - na)
        steady = round(tokens / seconds, 1) if len(self.marks) > 1 and seconds > 0 else None
        return {"first_step_s": round(t1 - self.t0, 2), "steady_tokens_per_s": steady}


def report(result: dict) -> None:
    """Called in a child: tokens/s = non-padding tokens consumed / Trainer's train_runtime."""
    result["tokens_per_s"] = result["tokens"] / result["train_time_s"]
    result["peak_mb"] = peak_mb()
    print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, *args: str) -> dict:
    p = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"{script} {' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def table(results: dict[str, dict], name: str) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'':24}{'tokens':>10}{'train s':>10}{'tokens/s':>10}{'peak MB':>10}")
    for label, x in results.items():
        if "tokens" in x:
            print(
                f"{label:24}{x['tokens']:>10}{x['train_time_s']:>10.1f}{x['tokens_per_s']:>10.1f}{x['peak_mb']:>10.0f}"
            )
