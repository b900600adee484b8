"""``mode: single``: one training set, one fit, scored before and after, forgetting measured. A prompting
baseline (a strategy that declares ``baseline``) skips the fit: the untouched model is scored, with the
stack's ``prompt_examples`` training rows shown before every eval prompt."""

from __future__ import annotations

from typing import Any

from tunelab.artefacts import save_artefact
from tunelab.data import prepare_splits
from tunelab.fitter import fit
from tunelab.forgetting import forgetting_summary
from tunelab.modes.base import RunMode
from tunelab.rundir import MODEL
from tunelab.runtime import world_size
from tunelab.streaming import stream_batch
from tunelab.summary import finish_summary


class SingleRun(RunMode):
    name = "single"

    @classmethod
    def row_note(cls, extra_tasks: str | None) -> str:
        return ""  # the default mode: its rows say nothing more

    def prepare_data(self) -> None:
        cfg, s = self.cfg, self.session
        self.train_data, self.eval_data = prepare_splits(
            cfg.data,
            s.tokenizer,
            cfg.training.max_length,
            cfg.training.seed,
            shots=s.stack.prompt_examples,
            score_on=cfg.eval.split,
            stream=stream_batch(cfg, s.stack, world_size()),
        )
        self.originals = s.original_tasks()

    def train(self) -> None:
        s, cfg = self.session, self.cfg
        self.eval_before = self.before_retention = None
        if self.main:  # the untouched model's scores, before anything trains
            if cfg.eval.before and self.eval_data is not None:
                self.eval_before = s.score_base(self.eval_data)
            self.before_retention = s.retention_before()
            self.score_originals_before()
        if s.stack.baseline:  # nothing trains: the scores after are the untouched model's
            self.stats = None
            return
        self.stats = fit(
            s, self.train_data.features, self.eval_data, self.run_dir, resume=self.resume, callbacks=self.callbacks
        )

    def save(self) -> dict[str, Any]:
        s, tr, ev = self.session, self.train_data, self.eval_data
        save_artefact(s.stack, s.model, s.tokenizer, self.run_dir / MODEL, (s.cfg.model, s.model_dir))
        summary = s.summary_head(self.name)
        summary["data"] = {
            "format": tr.format,
            "labels": tr.labels,
            "train": tr.stats.as_dict(),
            "eval": ev.stats.as_dict() if ev else None,
        }
        if self.eval_before is not None:
            summary["eval_before"] = self.eval_before
        if self.stats is not None:
            summary["train"] = self.stats
        if ev is not None:
            summary["eval"] = {**s.score(ev, record=self.cfg.eval.split), "split": self.cfg.eval.split}
        after = s.retention_after()
        self.add_forgetting(summary, forgetting_summary(self.before_retention, after) if after is not None else {})
        return finish_summary(summary, s.device, self.run_dir, self.t_start)
