"""The shape every run mode has (see tunelab.modes)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tunelab.config import RunConfig
from tunelab.data import DataError, prepare_splits
from tunelab.errors import RunError
from tunelab.forgetting import forgetting_summary
from tunelab.rundir import RunDir, guarded
from tunelab.runtime import is_main_process
from tunelab.session import Session


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]  #: what summary.json holds ({} on ranks other than 0)


class RunMode:
    name: ClassVar[str]
    resumable: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, callbacks=None):
        self.cfg, self.resume, self.overwrite, self.callbacks = cfg, resume, overwrite, callbacks
        self.t_start = time.perf_counter()
        self.main = is_main_process()
        self.run_dir = Path(cfg.output_dir)

    def run(self) -> RunResult:
        if self.resume and not self.resumable:
            raise RunError(f"--resume is not supported for {self.name} runs; start the run again")
        # -- set up
        self.session = Session(self.cfg, self.main, self.run_dir)
        self.prepare_data()
        claim, resolved = None, self.cfg.to_dict()
        if self.main:
            claim = RunDir.claim(self.run_dir, resume=self.resume, overwrite=self.overwrite, config=resolved)
        with guarded(claim, self.cfg.training.save_steps):
            self.session.load()
            if claim is not None:
                claim.begin(resolved, resume=self.resume)
            # -- train, save
            self.train()
            summary = self.save() if self.main else {}
        # -- clean up
        self.clean_up()
        return RunResult(self.run_dir, summary)

    def prepare_data(self) -> None:
        """Tokenize the mode's data with ``self.session.tokenizer`` (before any model loads)."""
        raise NotImplementedError

    def prepare_tasks(self) -> list[tuple[Any, Any, Any]]:
        """Each named task's (config, training split, eval split), for the modes that train ``tasks:``. A
        task's bad or missing file is named as that task's; every task must have references to score."""
        out = []
        for t in self.cfg.tasks:
            try:
                tr, ev = prepare_splits(
                    t, self.session.tokenizer, self.cfg.training.max_length, self.cfg.training.seed
                )
            except DataError as e:
                raise DataError(f"task {t.name}: {e}") from None
            if not ev.scorable:
                raise RunError(
                    f"task {t.name}: its eval rows have no references to score (accuracy / exact match)"
                )
            out.append((t, tr, ev))
        return out

    def train(self) -> None:
        raise NotImplementedError

    def save(self) -> dict[str, Any]:
        """Rank 0: write the artefact and summary.json; return the summary."""
        raise NotImplementedError

    def clean_up(self) -> None:
        del self.session

    # -- shared by the modes that score ``forgetting.original_tasks`` (``self.originals``) ------------------
    def score_originals_before(self) -> None:
        """Rank 0, before training: the untouched model's scores on the original tasks."""
        self.before_original = {f: self.session.score_base(p) for f, p in self.originals.items()}

    def add_forgetting(self, summary: dict[str, Any], forgetting: dict[str, Any]) -> None:
        """``summary["forgetting"]``: the retention part given, plus before/after on the original tasks."""
        if self.originals:
            forgetting["original_tasks"] = {
                f: forgetting_summary(self.before_original[f], self.session.score(p))
                for f, p in self.originals.items()
            }
        if forgetting:
            summary["forgetting"] = forgetting
