"""What a strategy's hooks may use from the run: the typed context, next to the contract
(tunelab.strategies.base). A strategy reaches the run only through this object, so a strategy that needs
something new (a teacher model, another data file) asks for it here, and the engine never learns of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Prepared, prepare_file
from tunelab.errors import RunError
from tunelab.forgetting import Reference, retention_batches


@dataclass
class RunContext:
    tokenizer: Any  #: the run's tokenizer (a transformers fast tokenizer)
    device: str  #: "cuda" or "cpu"
    bf16: bool  #: bf16 autocast is on
    seed: int  #: training.seed
    data_cfg: Any  #: the DataConfig of the (first) task: how rows are rendered
    max_length: int  #: training.max_length
    run_dir: Path  #: the run directory (a strategy may write its own files under it)
    retention: Prepared | None  #: the retention set, when a strategy or forgetting needs it (Need.RETENTION)
    reference: Reference  #: the base model's outputs (Need.BASE_OUTPUTS): ``reference.logits(ids, mask, bf16)``
    allow_pickle: bool = False  #: the run's allow_pickle, for models a strategy loads
    previous_features: list = field(default_factory=list)  #: continual: earlier tasks' training rows
    task_features: list = field(default_factory=list)  #: continual: the rows of the task just trained

    def retention_batches(self, batch_size: int) -> list[dict]:
        if self.retention is None:
            raise RunError("this strategy needs the retention set; set forgetting.enabled: true")
        return retention_batches(self.retention, self.tokenizer.pad_token_id, batch_size, self.device)

    def load_rows(self, path: str) -> list[dict]:
        """Tokenized rows of a data file, rendered as the run's own data."""
        return prepare_file(path, self.tokenizer, self.data_cfg, self.max_length).features

    def load_model(self, path_or_name: str, *, trainable: bool = False) -> torch.nn.Module:
        """A second model (e.g. a teacher): a known name, a local HF model directory, or a tunelab run dir
        (its trained model). Checked and loaded as the base model is, on the run's device; frozen and in
        eval mode unless ``trainable``."""
        from tunelab.artefacts import load_run
        from tunelab.models import load_model, resolve_model

        if (Path(path_or_name) / "config.yaml").is_file() and (Path(path_or_name) / ".tunelab-run").is_file():
            model = load_run(path_or_name).model
        else:
            allow = self.allow_pickle
            model = load_model(resolve_model(path_or_name, allow_pickle=allow), allow_pickle=allow)
        model.to(self.device)
        if not trainable:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    def load_tokenizer(self, path_or_name: str):
        """The tokenizer of a second model (a run dir's is in its model/ directory)."""
        from tunelab.models import load_tokenizer, resolve_model

        run_model = Path(path_or_name) / "model"
        if (Path(path_or_name) / ".tunelab-run").is_file() and run_model.is_dir():
            return load_tokenizer(run_model)
        return load_tokenizer(resolve_model(path_or_name, allow_pickle=self.allow_pickle))
