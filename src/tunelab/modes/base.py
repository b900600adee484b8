"""The shape every run mode has (see tunelab.modes)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tunelab import modelcard
from tunelab.config import RunConfig
from tunelab.data import DataError, prepare_splits
from tunelab.errors import RunError
from tunelab.evaluate import headline
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

    # -- what a finished run's summary.json says, read by the CLI and the comparison's rows ---------------
    @classmethod
    def result_lines(cls, s: dict[str, Any]) -> list[str]:
        """What ``tunelab train`` prints of a finished run of this mode (its ``summary.json``)."""
        p, t = s["parameters"], s.get("train")
        if t is None:
            lines = [f"scored {'+'.join(s['strategy'])} (nothing trained), {s['wall_time_s']:.0f} s"]
        else:
            lines = [
                f"trained {'+'.join(s['strategy'])}: {t['steps']} steps, {t['tokens_seen']:,} tokens, "
                f"{t['tokens_per_s']:.0f} tokens/s, peak memory {s['memory']['peak_mb']:.0f} MB, "
                f"{s['wall_time_s']:.0f} s"
            ]
        lines.append(f"trainable parameters: {p['trainable']:,} / {p['total']:,} ({p['trainable_pct']:.3f}%)")
        lines += cls.task_lines(s)
        if "eval" in s:
            h = headline(s["eval"])
            line = f"eval loss {s['eval']['loss']:.4f}, perplexity {s['eval']['perplexity']:.3f}"
            if h:
                line += f", {h[0]} {h[1]:.3f}"
                if "eval_before" in s and headline(s["eval_before"]):
                    line += f" (before: {headline(s['eval_before'])[1]:.3f})"
            lines.append(line)
        if "forgetting" in s and "after" in s["forgetting"]:
            f, b = s["forgetting"]["after"], s["forgetting"]["before"]
            lines.append(
                f"forgetting: KL to base {f['kl']:.4f}, base-answer perplexity {b['base_answer_ppl']:.3f} -> "
                f"{f['base_answer_ppl']:.3f}, base answers reproduced {f['exact_reproduction']:.0%}"
            )
        return [*lines, f"outputs: {s['outputs']['run_dir']}"]

    @classmethod
    def row_note(cls, extra_tasks: str | None) -> str:
        """What a comparison row adds after its strategy for a run of this mode (and the tasks it trained
        on beside the comparison's own data)."""
        return f" ({cls.name}" + (f", + {extra_tasks}" if extra_tasks else "") + ")"

    @classmethod
    def labels(cls, s: dict[str, Any], task: str | None = None) -> list[str] | None:
        """The label set a run of this mode recorded for its training data (``task``: that task's)."""
        return None if task is not None else (s.get("data") or {}).get("labels")

    @classmethod
    def task_lines(cls, s: dict[str, Any]) -> list[str]:
        """Lines of per-task scores, for the modes that score several tasks."""
        return []

    @classmethod
    def row_score(cls, s: dict[str, Any], task: str | None = None) -> tuple[str | None, float | None]:
        """A comparison row's metric and score: the eval split's headline metric (modes over several tasks:
        ``task``'s score, the comparison's own data, or else their own summary of all tasks)."""
        h = headline(s.get("eval") or {})
        return (h[0], float(h[1])) if h else (None, None)

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
            if summary:
                modelcard.write_run(self.run_dir, summary)
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
