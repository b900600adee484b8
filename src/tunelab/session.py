"""A session, the loader: the base model loaded, its strategy stack applied, the retention set built on the
untouched model, and the scores of the model as it stands. Training a session is the fitter's
(``tunelab.fitter.fit(session, ...)``: TrainingArguments, callbacks, resume); the run modes call both.

Every run mode holds one session: a single run fits it once, a continual run once per task. The session
knows nothing of modes or run directories beyond where a fit writes its checkpoints and logs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from tunelab import distributed, levers
from tunelab.config import RunConfig, check_model_fit
from tunelab.context import RunContext
from tunelab.data import Prepared, prepare_file
from tunelab.errors import RunError
from tunelab.evaluate import loss_and_perplexity, score
from tunelab.forgetting import Reference, build_retention_set, measure, retention_prompts, weights_digest
from tunelab.fsutil import write_text_atomic
from tunelab.models import base_dtype, count_parameters, load_model, load_tokenizer, resolve_model, tunelab_home
from tunelab.progress import status
from tunelab.rundir import PREDICTIONS
from tunelab.runtime import device, resolve_precision, world_size
from tunelab.strategies import Need
from tunelab.strategies.stack import StrategyStack


class Session:
    """A loaded base model with its strategies applied: what one run (or one continual sequence) trains."""

    def __init__(self, cfg: RunConfig, main: bool, run_dir: Path):
        """Everything that needs no model: the device, the model directory and tokenizer, the strategy
        stack, and the retention prompts (read now, so a bad ``forgetting.file`` fails before loading)."""
        self.cfg, self.main, self.run_dir = cfg, main, run_dir
        self.device = device()
        self.precision = resolve_precision(cfg.training.precision, self.device)
        self.bf16 = self.precision == "bf16"
        self.model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
        check_model_fit(cfg, self.model_dir)  # options that ask more of the model than it has, before loading
        self.tokenizer = load_tokenizer(self.model_dir)
        self.data_cfg = cfg.data if cfg.data is not None else cfg.tasks[0]
        self.stack = StrategyStack(cfg.strategy)
        self.distributed = distributed.resolve(cfg.training.distributed)
        if cfg.training.distributed == "auto" and self.distributed != "single":
            distributed.check_launch(cfg, self.distributed)  # as if the config had said it
        distributed.preflight(self.distributed, self.device)
        self.needs = self.stack.needs | ({Need.RETENTION} if cfg.forgetting.enabled else set())
        self.retention_prompts = retention_prompts(cfg.forgetting) if Need.RETENTION in self.needs else None

    def load(self) -> None:
        """Load the base model, build the retention set on it (untouched), apply the stack, prepare it."""
        from transformers import set_seed

        cfg = self.cfg
        set_seed(cfg.training.seed)
        loaded, options = levers.load_options(
            cfg.training,
            device=self.device,
            precision=self.precision,
            changes_base=self.stack.changes_base_weights,
        )
        self.load_options = options
        sharded = self.distributed if self.distributed in distributed.SHARDED else None
        frozen_bf16 = levers.frozen_in_bf16(
            cfg.training, precision=self.precision, changes_base=self.stack.changes_base_weights, sharded=sharded
        )
        dtype = levers.load_dtype(base_dtype(self.model_dir), frozen_bf16)
        self.model = load_model(self.model_dir, dtype, allow_pickle=cfg.allow_pickle, **options)
        if dtype != torch.float32:  # frozen linear weights straight from the file in bf16, the rest in fp32
            levers.upcast_all_but_frozen_linears(self.model)
        if loaded.base_quantization == "none":
            self.model = self.model.to(self.device)
        else:
            from peft import prepare_model_for_kbit_training

            self.model = prepare_model_for_kbit_training(
                self.model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
            )
        self.retention = None
        if Need.RETENTION in self.needs:
            self.retention = build_retention_set(
                self.model,
                self.tokenizer,
                self.model_dir,
                self.data_cfg,
                cfg.forgetting,
                cfg.training.max_length,
                self.bf16,
                tunelab_home(),
                self.retention_prompts,
            )
        if Need.LAYER_SCORES in self.needs:  # on the untouched model, before anything is applied
            self.stack.measured(self.layer_scores())
        set_seed(cfg.training.seed)
        self.model = self.stack.apply(self.model).to(self.device)
        self.trainable, self.total = count_parameters(self.model)
        self.levers = levers.resolve(
            cfg.training,
            self.model,
            needs_logits=Need.LOGITS in self.needs,
            changes_base=self.stack.changes_base_weights,
            precision=self.precision,
            loaded=loaded,
            sharded=sharded,
        )
        trained = {id(p) for p in self.stack.own_parameters(self.model)}
        if self.levers.frozen_weights == "bf16":
            levers.cast_frozen_linears(self.model, trained)
        if dtype != torch.float32:  # what the strategies train (and added in the base's dtype) in fp32
            levers.upcast_all_but_frozen_linears(self.model, trained)
        if loaded.base_quantization == "none":
            levers.own_storage(self.model)  # no tensor left mapped from the weight file
        if self.trainable == 0 and not self.stack.baseline:
            raise RunError(f"strategy {'+'.join(cfg.strategy_names())} leaves no parameter to train")
        if self.main:
            for line in self.stack.describe(self.model):
                status(line)
        if cfg.training.gradient_checkpointing and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()  # frozen embeddings + checkpointing still need input grads
        self.ctx = RunContext(
            tokenizer=self.tokenizer,
            device=self.device,
            bf16=self.bf16,
            seed=cfg.training.seed,
            data_cfg=self.data_cfg,
            max_length=cfg.training.max_length,
            run_dir=self.run_dir,
            retention=self.retention,
            reference=Reference(self.model, self.stack, self.model_dir, allow_pickle=cfg.allow_pickle),
            allow_pickle=cfg.allow_pickle,
        )
        self.stack.prepare(self.model, self.ctx)

    def layer_scores(self):
        """The blocks measured for the task (tunelab.layers), written to RUN/layers.json; a resumed run reads
        its own file back (when model, data and settings are unchanged), so it chooses what it chose."""
        from tunelab.layers import LAYERS, measure_run, run_key
        from tunelab.strategies import LayerScores, MeasureSettings

        path = self.run_dir / LAYERS
        estimators = self.stack.estimators()
        if path.is_file():
            kept = LayerScores.load(path)
            settings = MeasureSettings(estimators=tuple(kept.settings["estimators"]), seed=self.cfg.training.seed)
            if kept.key == run_key(self.cfg, self.model_dir, settings) and set(estimators) <= set(kept.scores):
                return kept
        say = status if self.main else None
        scores = measure_run(self.cfg, self.model, self.tokenizer, self.model_dir, self.bf16, estimators, say)
        if self.main:
            scores.save(path)
        return scores

    # -- scores of the untouched model and after training ----------------------------------------
    def score_base(self, prepared: Prepared) -> dict[str, Any]:
        """Scores of the untouched model (before training): added modules switched off. Kept in
        ``TUNELAB_HOME/base-scores/`` under a digest of everything they depend on (the weights, the scored
        rows as tokenized, the eval settings, precision, device, attention, the strategies, the libraries'
        versions), so a run like an earlier one (a second demo, another seed) reads them instead."""
        path = tunelab_home() / "base-scores" / f"{self._base_scores_key(prepared)}.json"
        try:
            cached = json.loads(path.read_text())
            status("eval before training: the untouched model's scores (cached)")
            return cached
        except (OSError, ValueError):
            pass
        with self.stack.disabled(self.model):
            result = score(
                self.model, self.tokenizer, prepared, self.cfg.eval, self.bf16, desc="eval before training"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(result))
        except OSError:  # a read-only home: computed again next time
            pass
        return result

    def _base_scores_key(self, prepared: Prepared) -> str:
        import transformers

        n = self.cfg.eval.max_examples or len(prepared.features)
        rows = [
            (f["input_ids"], f["labels"], p, r)
            for f, p, r in zip(prepared.features[:n], prepared.prompts[:n], prepared.references[:n], strict=True)
        ]
        blob = json.dumps(
            [
                weights_digest(self.model_dir),
                rows,
                prepared.format,
                prepared.labels,
                self.cfg.eval.model_dump(mode="json"),
                self.cfg.to_dict()["strategy"],
                self.precision,
                self.device,
                self.load_options.get("attn_implementation"),
                torch.__version__,
                transformers.__version__,
            ],
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def score(self, prepared: Prepared, desc: str = "eval", record: str | None = None) -> dict[str, Any]:
        """Scores of the model as it stands; ``record`` keeps each row's answer (predictions/<record>.jsonl)."""

        def classify(ids, mask):
            return self.stack.classify(self.model, ids.to(self.device), mask.to(self.device), self.bf16)

        out = self.run_dir / PREDICTIONS / f"{record}.jsonl" if record else None
        return score(self.model, self.tokenizer, prepared, self.cfg.eval, self.bf16, 3, classify, desc, out)

    def retention_before(self) -> dict[str, Any] | None:
        """Retention metrics of the untouched model: KL 0 and exact reproduction 1 by construction."""
        if self.retention is None or not self.cfg.forgetting.enabled:
            return None
        with self.stack.disabled(self.model):  # before training, base weights are still the base's
            m = loss_and_perplexity(self.model, self.retention, self.tokenizer.pad_token_id, 8, self.bf16)
        return {
            "kl": 0.0,
            "base_answer_ppl": m["perplexity"],
            "exact_reproduction": 1.0,
            "prompts": len(self.retention.features),
        }

    def retention_after(self) -> dict[str, Any] | None:
        if self.retention is None or not self.cfg.forgetting.enabled:
            return None
        return measure(
            self.model, self.tokenizer, self.retention, self.ctx.reference, self.cfg.forgetting, self.bf16
        )

    def original_tasks(self) -> dict[str, Prepared]:
        return {
            f: prepare_file(f, self.tokenizer, self.data_cfg, self.cfg.training.max_length)
            for f in self.cfg.forgetting.original_tasks
        }

    # -- training ----------------------------------------------------------------------------------
    def unsharded(self, trainer) -> torch.nn.Module | None:
        """After a sharded training: the trained weights, gathered whole, in a model of the main process's own
        (the base model with the stack applied anew), on which scoring, forgetting and the artefact run as
        after any training; None on the other processes, whose part is done."""
        state = distributed.full_state_dict(trainer)  # every process takes part in the gather
        if not self.main:
            return None
        base = load_model(self.model_dir, allow_pickle=self.cfg.allow_pickle, **self.load_options)
        model, self.stack = distributed.rebuilt(base, self.cfg.strategy, self.stack, state)
        self.ctx.reference = Reference(model, self.stack, self.model_dir, allow_pickle=self.cfg.allow_pickle)
        return model.to(self.device)

    # -- what every summary starts with --------------------------------------------------------------
    def summary_head(self, mode: str) -> dict[str, Any]:
        return {
            "mode": mode,
            "strategy": self.cfg.strategy_names(),
            "model": str(self.model_dir),
            "device": self.device,
            "precision": self.precision,
            "world_size": world_size(),
            "distributed": self.distributed,
            "levers": self.levers.as_dict(),
            "parameters": {
                "trainable": self.trainable,
                "total": self.total,
                "trainable_pct": round(100 * self.trainable / self.total, 4),
                "components": self.stack.components,
            },
            **({"strategies": reports} if (reports := self.stack.reports()) else {}),
        }
