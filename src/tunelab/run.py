"""The public API, one function per CLI verb (``tunelab.train`` etc.), gathered from where each job lives:

- ``tunelab.modes`` — training: the run modes (single, continual) and their table; ``train`` dispatches;
- ``tunelab.session`` — a loaded model with its strategy stack, and one Trainer run over it;
- ``tunelab.rundir`` — the run directory: marker, lock, what may be replaced, how a run ends;
- ``tunelab.artefacts`` — the final artefact: written atomically and never non-finite, read back;
- ``tunelab.readback`` — evaluate, generate, merge, export, push;
- ``tunelab.lab`` — compare (several variants, one comparison dir) and report (its tables and plots);
- ``tunelab.summary`` — summary.json and its versioned schema;
- ``tunelab.runtime`` — device, precision, rank, memory.

Run directory layout::

    RUN/config.yaml       the resolved config (every default filled in)
    RUN/.tunelab-run      the marker: this is a tunelab run, its status, PID, time
    RUN/metrics.jsonl     one JSON line per log event (loss and its terms, lr per group, tokens/s, eval loss)
    RUN/tb/               TensorBoard event files
    RUN/checkpoints/      resumable Trainer checkpoints (model, optimizer, scheduler, RNG, data position)
    RUN/model/            the final artefact: a PEFT adapter dir or a standalone safetensors model, + tokenizer
    RUN/summary.json      task metrics, parameters, tokens, tokens/s, peak memory, wall time (docs/summary.md)

Under ``torchrun`` every rank trains; only rank 0 writes anything.
"""

from __future__ import annotations

from tunelab.artefacts import LoadedRun, load_artefact, load_run
from tunelab.errors import RunError
from tunelab.lab.compare import compare
from tunelab.lab.report import write_report as report
from tunelab.layers import measure_layers
from tunelab.modes import RunResult, train
from tunelab.readback import evaluate, export, generate, merge, push, push_files

__all__ = [
    "LoadedRun",
    "RunError",
    "RunResult",
    "compare",
    "evaluate",
    "generate",
    "measure_layers",
    "load_artefact",
    "load_run",
    "merge",
    "export",
    "push",
    "push_files",
    "report",
    "train",
]
