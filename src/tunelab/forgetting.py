"""Measuring forgetting against the untouched base model.

The retention set is a list of general prompts (:data:`BUILTIN_PROMPTS`, written for this project, plus
any user file) whose references are **the base model's own greedy answers**, generated once per model and
cached under ``$TUNELAB_HOME/retention/``. After training, tunelab reports on it:

- ``kl``: token-level KL(base || tuned), teacher-forced on prompt + base answer, averaged over the answer
  tokens: how far the tuned model's next-token distributions moved where the base model was sure of its
  own answer. 0 for the untouched model.
- ``base_answer_ppl``: perplexity of the base answers under the tuned model (before: under the base).
- ``exact_reproduction``: share of prompts for which the tuned model's greedy answer equals the base
  answer (1.0 before training, by construction).

Base distributions come from the model with every added module switched off (by the strategy stack) when
the strategies only add modules (LoRA, prefix, adapters, ...), so no second model is loaded; a frozen copy
of the base model is loaded only when a strategy changes base weights (full, layer-wise). That copy never
receives gradients.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE, Collator, DataError, Prepared, batches, prepare_rows, read_rows
from tunelab.evaluate import autocast, generate_all, normalize
from tunelab.progress import track

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "How many days are there in a leap year?",
    "Name three primary colours.",
    "What is 12 times 8?",
    "Explain in one sentence what photosynthesis is.",
    "Translate 'good morning' into Spanish.",
    "Who wrote 'Romeo and Juliet'?",
    "What is the boiling point of water in Celsius?",
    "Give a synonym for 'happy'.",
    "What does a thermometer measure?",
    "Write a short greeting for a birthday card.",
    "What is the largest planet in our solar system?",
    "List the days of the week.",
    "How many legs does a spider have?",
    "What is the opposite of 'cold'?",
    "Name a fruit that is yellow.",
    "What gas do humans need to breathe?",
    "What is 100 divided by 4?",
    "In which continent is Kenya?",
    "Give one tip for staying healthy.",
    "What is the freezing point of water in Fahrenheit?",
    "Name a musical instrument with strings.",
    "What is the chemical symbol for gold?",
    "Describe the colour of the sky on a clear day.",
    "How many minutes are in an hour?",
    "Which animal is known as the king of the jungle?",
    "What is the square root of 81?",
    "Suggest a name for a pet cat.",
    "What language is spoken in Brazil?",
    "Why do we wear sunscreen?",
    "What is the main ingredient of guacamole?",
    "Complete the sentence: The early bird catches the",
]


class Reference:
    """Base-model logits for a batch, without gradients: the adapted model with its additions disabled, or
    (when a strategy changes base weights) a frozen copy of the base model, loaded once on first use."""

    def __init__(self, model: torch.nn.Module, stack, model_dir: Path, *, allow_pickle: bool = False):
        self.model = model
        self.stack = stack  # the run's StrategyStack: it switches its additions off
        self.needs_copy = stack.changes_base_weights
        self.model_dir = model_dir
        self.allow_pickle = allow_pickle
        self._copy: torch.nn.Module | None = None

    def frozen_copy(self) -> torch.nn.Module:
        if self._copy is None:
            from tunelab.models import load_model

            self._copy = load_model(self.model_dir, allow_pickle=self.allow_pickle).eval()
            for p in self._copy.parameters():
                p.requires_grad_(False)
            self._copy.to(next(self.model.parameters()).device)
        return self._copy

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bf16: bool) -> torch.Tensor:
        device = input_ids.device
        if self.needs_copy:
            with autocast(device, bf16):
                return self.frozen_copy()(input_ids=input_ids, attention_mask=attention_mask).logits
        was = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with self.stack.disabled(self.model), autocast(device, bf16):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.model.train(was)


def label_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits at the positions that predict a label token: ``[B, L(+virtual), V]`` -> ``[N, V]``.

    Only the last L positions count (prompt learners prepend virtual tokens); position t predicts token
    t+1, as in the training loss."""
    n = labels.shape[1]
    return logits[:, -n:][:, :-1][labels[:, 1:] != IGNORE]


def divergence(q_logits: torch.Tensor, p_logits: torch.Tensor, kind: str, temperature: float, beta: float = 0.5):
    """Per-row divergence between the distributions ``p`` (reference, e.g. a teacher or the base model) and
    ``q`` (the model being trained), both softened by ``temperature``; logits ``[N, V]`` -> ``[N]``.

    ``forward_kl``: KL(p || q); ``reverse_kl``: KL(q || p); ``jsd``: β·KL(p || m) + (1-β)·KL(q || m) with
    m = β·p + (1-β)·q (the generalised Jensen-Shannon divergence of GKD, Agarwal et al., 2024)."""
    log_q = F.log_softmax(q_logits.float() / temperature, -1)
    log_p = F.log_softmax(p_logits.float() / temperature, -1)
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))  # log(βp + (1-β)q)
        to_m = (log_p.exp() * (log_p - log_m)).sum(-1), (log_q.exp() * (log_q - log_m)).sum(-1)
        return beta * to_m[0] + (1 - beta) * to_m[1]
    raise ValueError(kind)


def token_kl(base_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed KL(base || tuned) over the positions that predict a label token, and their count."""
    kl = divergence(label_positions(logits, labels), label_positions(base_logits, labels), "forward_kl", 1.0)
    return kl.sum(), kl.shape[0]


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the model's weight files' contents: a model changed in place (same path, size, even the
    same mtime) gets another digest. About 1 s per GB."""
    h = hashlib.sha256()
    for w in sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")):
        h.update(w.name.encode() + b"\0")
        with w.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _cache_key(model_dir: Path, prompts: list[str], max_new_tokens: int, data_cfg) -> str:
    """The base answers depend on the weights, the prompts, their rendering and the answer length."""
    blob = json.dumps(
        [weights_digest(model_dir), prompts, max_new_tokens, data_cfg.template, data_cfg.system_prompt]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def retention_prompts(cfg) -> list[str]:
    prompts = list(BUILTIN_PROMPTS) if cfg.builtin else []
    if cfg.file:
        rows = read_rows(cfg.file)
        missing = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if missing:
            raise DataError(
                f"forgetting.file {cfg.file}: rows {missing[:5]} have no 'prompt' field; the retention file needs "
                f"a 'prompt' column (it has: {', '.join(sorted(rows[0])) if rows else 'no rows'})"
            )
        prompts += [r["prompt"] for r in rows]
    return prompts


def build_retention_set(
    base_model, tokenizer, model_dir: Path, data_cfg, fcfg, max_length: int, bf16: bool, home: Path, prompts=None
) -> Prepared:
    """Retention prompts (``prompts``, default :func:`retention_prompts`) with the untouched base model's
    greedy answers (cached per model weights, prompt set and rendering)."""
    prompts = retention_prompts(fcfg) if prompts is None else prompts
    key = _cache_key(model_dir, prompts, fcfg.max_new_tokens, data_cfg)
    cache = home / "retention" / f"{key}.json"
    if cache.is_file():
        answers = json.loads(cache.read_text())["answers"]
    else:
        fmt_cfg = _as_pairs(data_cfg, skip_bad_rows=False)
        probe = prepare_rows(
            [{"prompt": p, "completion": "x"} for p in prompts], tokenizer, fmt_cfg, max_length, source="retention"
        )
        base_model.eval()
        answers = generate_all(
            base_model,
            tokenizer,
            probe.prompts,
            fcfg.max_new_tokens,
            bf16,
            16,
            "forgetting: the base model's answers (cached)",
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a per-process temp name: torchrun ranks may write the same cache entry at once
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "answers": answers}, indent=1))
        tmp.replace(cache)
    rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True) if a.strip()]
    return prepare_rows(rows, tokenizer, _as_pairs(data_cfg, skip_bad_rows=True), max_length, source="retention")


def _as_pairs(data_cfg, *, skip_bad_rows: bool):
    """The run's rendering (chat template, system prompt) for plain prompt/completion retention rows."""
    return data_cfg.model_copy(
        update={
            "format": "prompt_completion",
            "columns": {},
            "train_on": "completion",
            "skip_bad_rows": skip_bad_rows,
        }
    )


def retention_batches(retention: Prepared, pad_id: int, batch_size: int, device) -> list[dict]:
    collate = Collator(pad_id)
    return [
        {k: v.to(device) for k, v in collate(chunk).items()} for chunk in batches(retention.features, batch_size)
    ]


@torch.no_grad()
def measure(
    model, tokenizer, retention: Prepared, reference: Reference, fcfg, bf16: bool, generate: bool = True
) -> dict[str, Any]:
    """KL to the base, perplexity of base answers, and exact reproduction of base answers."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        kl_sum, nll_sum, count = 0.0, 0.0, 0
        todo = retention_batches(retention, tokenizer.pad_token_id, 8, device)
        for batch in track(todo, "forgetting: KL to the base", len(todo), "batch"):
            with autocast(device, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            base = reference.logits(batch["input_ids"], batch["attention_mask"], bf16)
            kl, n = token_kl(base, logits, batch["labels"])
            kl_sum += float(kl)
            count += n
            lg = logits[:, -batch["labels"].shape[1] :][:, :-1].float()
            nll_sum += float(
                F.cross_entropy(
                    lg.reshape(-1, lg.size(-1)),
                    batch["labels"][:, 1:].reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
        out = {
            "kl": kl_sum / max(count, 1),
            "base_answer_ppl": float(torch.exp(torch.tensor(min(nll_sum / max(count, 1), 50.0)))),
            "prompts": len(retention.features),
        }
        if generate:
            preds = generate_all(
                model, tokenizer, retention.prompts, fcfg.max_new_tokens, bf16, 16, "forgetting: generating"
            )
            same = [normalize(p) == normalize(r) for p, r in zip(preds, retention.references, strict=True)]
            out["exact_reproduction"] = sum(same) / len(same)
        return out
    finally:
        model.train(was)


def forgetting_summary(before: dict, after: dict) -> dict[str, Any]:
    """``forgetting.*`` for summary.json: before, after and after - before for every metric."""
    keys = [k for k in after if k in before and isinstance(after[k], int | float) and k != "prompts"]
    return {"before": before, "after": after, "delta": {k: after[k] - before[k] for k in keys}}
