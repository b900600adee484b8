"""Where a training's resident memory goes, phase by phase (issue 23, point 2).

    python bench/memory_phases.py [--method lora|full] [--shape tickets|short|long] [--steps 20]
                                  [--tunelab '{"compile": "off"}']

One ``tunelab.train`` in this process (forgetting and evaluation off: the bench follows training), with a
thread reading the resident set (``/proc/self/statm``) every 20 ms. The phases are marked where tunelab
moves from one to the next: imports done, data prepared (``RunMode.prepare_data``), model loaded and
strategies applied (``Session.load``), first optimizer step, the steady steps, and the save after training.
Prints, per phase, the resident set at its end and its peak; and the bytes per parameter the model holds
once loaded (resident set after loading − before, over every parameter of the model): a 135 M model whose
frozen weights are bf16 needs 2 bytes for them, fp32 trained weights 4, AdamW's moments 8 more.

The wrapping of two tunelab methods below marks phases only; it changes nothing they do.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Sampler(threading.Thread):
    """The resident set every ``dt`` seconds, and the marks that cut it into phases."""

    def __init__(self, dt: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dt, self.samples, self.marks, self.stop = dt, [], [], False
        self.mark("start")

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter(), rss_mb()))

    def run(self) -> None:
        while not self.stop:
            self.samples.append((time.perf_counter(), rss_mb()))
            time.sleep(self.dt)

    def phases(self) -> list[dict]:
        out = []
        for (_, t0, _r0), (name, t1, r1) in zip(self.marks, self.marks[1:], strict=False):
            inside = [r for t, r in self.samples if t0 <= t <= t1] + [r1]
            out.append(
                {"phase": name, "seconds": round(t1 - t0, 2), "end_mb": round(r1), "peak_mb": round(max(inside))}
            )
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--shape", choices=["tickets", "short", "long"], default="short")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tunelab", default="{}", help="extra training options (JSON)")
    a = ap.parse_args()
    from tunelab import malloc

    malloc.preload()  # as the tunelab command does: tcmalloc or jemalloc where installed (TUNELAB_MALLOC)
    sampler = Sampler()
    sampler.start()
    import tempfile

    import torch  # noqa: F401  (imports are a phase of their own)

    from common import MAX_LEN, shape_rows
    from tunelab.demo import write_jsonl
    from tunelab.models import resolve_model
    from tunelab.modes.single import SingleRun
    from tunelab.run import train
    from tunelab.session import Session

    model_dir = str(resolve_model(a.model))
    sampler.mark("imports")
    loaded: dict = {}

    def marking(cls, name, label, after=None):
        inner = getattr(cls, name)

        def wrapped(self, *args, **kw):
            out = inner(self, *args, **kw)
            sampler.mark(label)
            if after:
                after(self)
            return out

        setattr(cls, name, wrapped)

    def after_load(session):
        loaded["parameters"] = sum(p.numel() for p in {id(p): p for p in session.model.parameters()}.values())
        loaded["dtypes"] = {}
        for p in session.model.parameters():
            key = f"{str(p.dtype).removeprefix('torch.')}{' trained' if p.requires_grad else ''}"
            loaded["dtypes"][key] = loaded["dtypes"].get(key, 0) + p.numel()

    marking(SingleRun, "prepare_data", "data prepared")
    marking(Session, "load", "model loaded", after_load)

    class Steps:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *x, **k: None
            raise AttributeError(name)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                sampler.mark("first step")

        def on_train_end(self, args, state, control, **kw):
            sampler.mark("steady steps")

    strategy = (
        {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
        if a.method == "lora"
        else "full"
    )
    with tempfile.TemporaryDirectory() as d:
        data = write_jsonl(shape_rows(a.shape, a.steps * a.batch_size), Path(d) / "train.jsonl")
        cfg = {
            "model": model_dir,
            "data": {"train": str(data)},
            "strategy": strategy,
            "training": {
                "max_steps": a.steps,
                "batch_size": a.batch_size,
                "lr": 1e-3 if a.method == "lora" else 5e-5,
                "max_length": MAX_LEN[a.shape],
                "save_steps": 10 * a.steps,
                **json.loads(a.tunelab),
            },
            "forgetting": {"enabled": False},
            "output_dir": str(Path(d) / "run"),
        }
        result = train(cfg, callbacks=[Steps()])
        sampler.mark("save")
    sampler.stop = True
    phases = sampler.phases()
    before_load = next(p["end_mb"] for p in phases if p["phase"] == "data prepared")
    after_load = next(p["end_mb"] for p in phases if p["phase"] == "model loaded")
    per_param = (after_load - before_load) * 2**20 / loaded["parameters"]
    s = result.summary
    print(f"{a.method}, {a.shape} rows, {a.steps} steps of {a.batch_size}; levers {s['levers']}")
    print(f"{'phase':16}{'seconds':>9}{'RSS at end MB':>15}{'peak in it MB':>15}")
    for p in phases:
        print(f"{p['phase']:16}{p['seconds']:>9.1f}{p['end_mb']:>15,}{p['peak_mb']:>15,}")
    print(
        f"model load: +{after_load - before_load:,.0f} MB for {loaded['parameters'] / 1e6:.1f} M parameters = "
        f"{per_param:.2f} bytes per parameter; parameters by dtype: "
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in loaded["dtypes"].items())
    )
    print(f"tokens/s {s['train']['tokens_per_s']:.1f}; run peak {s['memory']['peak_mb']:.0f} MB")
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"memory_{a.method}_{a.shape}.json").write_text(
        json.dumps({"phases": phases, "bytes_per_parameter": per_param, **loaded, "levers": s["levers"]}, indent=2)
    )


if __name__ == "__main__":
    main()
