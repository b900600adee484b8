"""Run modes: the ways tunelab trains, each a class shaped set up -> train -> save -> clean up.

A config states its mode (``mode: single | continual | multitask``; ``tasks:`` without a mode means
continual, ``data:`` single), and :data:`MODES` is the one table that maps it to its class. A new mode is a
module here with a :class:`RunMode` subclass, one entry in :data:`MODES` and one in the config's ``mode``
values (a test keeps the two in step); the CLI and the API dispatch through the table.

The fixed shape, in :meth:`RunMode.run`:

1. **set up** — the session (model dir, tokenizer, strategy stack: nothing loaded yet), then the mode's data
   (tokenized now, so bad rows fail before the model loads), then the run dir is claimed (checked and
   locked, nothing deleted), then the model loads and the stack applies; only then does the run begin (an
   old run being replaced is deleted, the marker and config are written);
2. **train** — the mode's own loop over ``Session.fit``;
3. **save** — rank 0 writes the artefact and ``summary.json`` (validated against tunelab.summary);
4. **clean up** — the run dir records how the run ended and its lock is released (tunelab.rundir.guarded),
   and the session is dropped.
"""

from __future__ import annotations

import os

from tunelab.config import RunConfig, load_config
from tunelab.modes.base import RunMode, RunResult
from tunelab.modes.continual import ContinualRun
from tunelab.modes.multitask import MultitaskRun
from tunelab.modes.single import SingleRun
from tunelab.runtime import objects_frozen, reset_peak_memory

#: The one table of run modes, by the name a config's ``mode`` gives.
MODES: dict[str, type[RunMode]] = {m.name: m for m in (SingleRun, ContinualRun, MultitaskRun)}

__all__ = ["MODES", "RunMode", "RunResult", "train"]


def train(
    config: RunConfig | str | os.PathLike | dict,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
) -> RunResult:
    """Train as ``config`` says and write the run directory. Mirrors ``tunelab train``."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    with objects_frozen():  # the garbage collector's walks skip what the imports and the caller made
        reset_peak_memory()  # the summary's peak memory is this run's, not an earlier one's in this process
        return MODES[cfg.mode](cfg, resume=resume, overwrite=overwrite, callbacks=callbacks).run()
