"""Scoring a model on a prepared split: loss and perplexity on the loss-carrying tokens, and, where rows have
references, exact match (or accuracy, for classification) of greedy generations.

Perplexity is ``exp(mean NLL)`` over exactly the tokens that carry loss in training (completion/assistant
tokens by default), weighted per token across batches, so it does not depend on the batch size.
Generations are compared after normalisation: surrounding white space and a trailing full stop removed,
case folded.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import metrics
from tunelab.data import IGNORE, Collator, Prepared, batches, lengths
from tunelab.fsutil import write_text_atomic
from tunelab.losshead import PositionsHead, supports_positions_head
from tunelab.metrics import normalize  # noqa: F401  (re-exported: forgetting and tests read it here)
from tunelab.models import unwrap
from tunelab.progress import bar, track


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def loss_and_perplexity(
    model, prepared: Prepared, pad_id: int, batch_size: int, bf16: bool, desc: str = "loss"
) -> dict[str, float]:
    device = next(model.parameters()).device
    collate = Collator(pad_id)
    nll, count = 0.0, 0
    order = np.argsort(lengths(prepared.features), kind="stable").tolist()
    chunks = list(batches(order, batch_size))
    # the vocabulary head at the positions that carry loss only, as in training (tunelab.losshead): most
    # positions are prompt, and their logits over the whole vocabulary were most of an eval batch's memory
    head = PositionsHead(model) if supports_positions_head(model) is None else None
    for idx in track(chunks, desc, len(chunks), "batch"):
        batch = {k: v.to(device) for k, v in collate([prepared.features[i] for i in idx]).items()}
        labels = batch["labels"][:, 1:]
        if head is not None:
            with autocast(device, bf16), head.capturing(batch["labels"]):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                nll += float(head.loss(1))  # the sum over the batch's loss positions
        else:
            with autocast(device, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # prompt learners (prompt tuning, P-tuning) prepend virtual tokens: keep the real positions
            logits = logits[:, -batch["input_ids"].shape[1] :][:, :-1].float()
            nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            ).item()
        count += int((labels != IGNORE).sum())
    mean = nll / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


DECODE_BY_FORWARD = "tunelab_decode_by_forward"


def decode_by_forward(model: torch.nn.Module) -> None:
    """Mark ``model`` as one whose ``generate()`` disagrees with its own forward pass: a wrapper that puts
    virtual tokens in front of the input (prompt learning says so when it builds or loads the model).
    :func:`new_tokens` then decodes it itself, one row at a time: the prompt through the wrapper (virtual
    tokens included), each new token through the plain model inside it with the key/value cache that forward
    left, which is what a full forward over prompt and answer computes."""
    setattr(unwrap(model), DECODE_BY_FORWARD, True)


def new_tokens(
    model,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    pad_id: int,
    eos_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    pure: bool = False,
) -> list[torch.Tensor]:
    """The tokens generated after each prompt (1-D id tensors on the model's device), through the first
    end-of-sequence; greedy unless ``do_sample`` (at ``temperature``, with the model's own top-k/top-p
    settings unless ``pure``: from the whole distribution). Batched through ``generate()`` with left padding,
    or, for a model marked by :func:`decode_by_forward`, one row at a time without padding (exactly the
    computation the model was trained with; sampling there is pure)."""
    if getattr(unwrap(model), DECODE_BY_FORWARD, False):
        return [_by_forward(model, p, max_new_tokens, eos_id, do_sample, temperature) for p in prompts]
    device, width = prompts[0].device, max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # decoder-only: new tokens must follow the prompt directly
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    sampling = {"temperature": temperature, **({"top_k": 0, "top_p": 1.0} if pure else {})} if do_sample else {}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        do_sample=do_sample,
        **sampling,
    )
    return [_through_eos(row[width:], eos_id) for row in out]


def _through_eos(new: torch.Tensor, eos_id: int) -> torch.Tensor:
    ends = (new == eos_id).nonzero()
    return new[: int(ends[0]) + 1] if len(ends) else new


def _by_forward(model, prompt: torch.Tensor, n: int, eos_id: int, do_sample: bool, temperature: float):
    ids, out, cache = prompt[None], [], None
    inner = unwrap(model)  # the wrapper's virtual tokens are in the cache after the first forward
    for _ in range(n):
        if cache is None:
            result = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        else:
            mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=ids.device)
            result = inner(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        logits = result.logits[0, -1].float()
        if do_sample:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[0]
        else:
            nxt = logits.argmax()
        out.append(nxt)
        if int(nxt) == eos_id:
            break
        ids = nxt.view(1, 1)
    return torch.stack(out) if out else prompt.new_zeros(0)


def generate_batch(
    model, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, bf16: bool, **sampling
) -> list[str]:
    """Greedy (unless ``do_sample=True, temperature=T``) generations for prompts, decoded without special
    tokens."""
    device = next(model.parameters()).device
    special = prompts[0][1]
    ids = [
        torch.tensor(tokenizer(p, add_special_tokens=special)["input_ids"], dtype=torch.long, device=device)
        for p, _ in prompts
    ]
    with torch.no_grad(), autocast(device, bf16):
        new = new_tokens(
            model, ids, max_new_tokens, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, **sampling
        )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def generate_all(
    model, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, bf16: bool, batch_size: int, desc: str
) -> list[str]:
    """:func:`generate_batch` over ``prompts`` in batches of ``batch_size``, with a progress bar named ``desc``."""
    out: list[str] = []
    with bar(desc, len(prompts), "prompt") as b:
        for chunk in batches(prompts, batch_size):
            out += generate_batch(model, tokenizer, chunk, max_new_tokens, bf16)
            b.update(len(chunk))
    return out


def score(
    model,
    tokenizer,
    prepared: Prepared,
    eval_cfg,
    bf16: bool,
    samples: int = 3,
    classify=None,
    desc: str = "eval",
    record: Path | None = None,
) -> dict[str, Any]:
    """All metrics for one split (:mod:`tunelab.metrics`; ``primary`` names the one that ranks); ``samples``
    (prompt, reference, prediction) examples are kept. With ``classify(input_ids, attention_mask)`` (class
    logits, or None where the model has no classifier), classification splits also get ``head_accuracy``.
    ``desc`` names the phase on the progress bars. With ``record``, every scored row's reference and answer
    are written there (:func:`write_predictions`), for a comparison's paired intervals."""
    was_training = model.training
    model.eval()
    try:
        n = eval_cfg.max_examples or len(prepared.features)
        sub = Prepared(
            prepared.features[:n],
            prepared.prompts[:n],
            prepared.references[:n],
            prepared.stats,
            prepared.format,
            prepared.labels,
        )
        result: dict[str, Any] = loss_and_perplexity(
            model, sub, tokenizer.pad_token_id, eval_cfg.batch_size, bf16, desc=f"{desc}: loss"
        )
        result["examples"] = len(sub.features)
        scored = [
            (p, r) for p, r in zip(sub.prompts, sub.references, strict=True) if p is not None and r is not None
        ]
        if scored:
            preds = generate_all(
                model,
                tokenizer,
                [p for p, _ in scored],
                eval_cfg.max_new_tokens,
                bf16,
                eval_cfg.batch_size,
                f"{desc}: generating",
            )
            refs = [r for _, r in scored]
            names, result["primary"] = metrics.chosen(eval_cfg, prepared.format, refs)
            for name in names:
                result[name] = metrics.compute(name, preds, refs, prepared.labels)
            if record is not None:
                write_predictions(record, refs, preds, names, prepared.labels)
            result["samples"] = [
                {"prompt": p[0], "reference": r, "prediction": pred}
                for (p, r), pred in list(zip(scored, preds, strict=True))[:samples]
            ]
            if classify is not None and prepared.format == "classification" and prepared.labels:
                head = head_accuracy(tokenizer, scored, prepared.labels, eval_cfg.batch_size, classify)
                if head is not None:
                    result["head_accuracy"] = head
        return result
    finally:
        model.train(was_training)


def write_predictions(path: Path, refs: list[str], preds: list[str], names: list[str], labels) -> None:
    """Each scored row (its index, reference and answer), after a header line with the metrics and labels,
    written atomically: what :func:`read_predictions` gives back to recompute any metric on any subset."""
    head = {"metrics": names, "labels": labels, "rows": len(refs)}
    lines = [json.dumps(head)] + [
        json.dumps({"i": i, "reference": r, "prediction": p}, ensure_ascii=False)
        for i, (r, p) in enumerate(zip(refs, preds, strict=True))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_predictions(path: Path) -> tuple[dict, list[str], list[str]]:
    """The header, references and answers of a file :func:`write_predictions` wrote."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    head, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.strip()]
    if len(rows) != head["rows"]:
        raise ValueError(f"{path}: {len(rows)} rows, the header says {head['rows']}")
    return head, [r["reference"] for r in rows], [r["prediction"] for r in rows]


def head_accuracy(tokenizer, scored, labels: list[str], batch_size: int, classify) -> float | None:
    """The share of (prompt, reference) pairs whose classifier argmax is the reference label."""
    hits = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for chunk in batches(scored, batch_size):
            enc = tokenizer(
                [p for (p, _), _ in chunk], add_special_tokens=chunk[0][0][1], padding=True, return_tensors="pt"
            )
            logits = classify(enc["input_ids"], enc["attention_mask"])
            if logits is None:
                return None
            hits += [labels[i] == r for i, (_, r) in zip(logits.argmax(-1).tolist(), chunk, strict=True)]
    finally:
        tokenizer.padding_side = side
    return sum(hits) / len(hits)


def fmt(v: Any) -> str:
    """A figure as tables show it (the comparison report, the model card): 4 significant digits, thousands
    separated, blank for none."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def headline(scores: dict[str, Any]) -> tuple[str, float] | None:
    """The task score a user reads first: the split's primary metric (summaries written before metrics were
    chosen: accuracy, else exact match), else None."""
    for key in (scores.get("primary"), "accuracy", "exact_match"):
        if key is not None and key in scores:
            return key, scores[key]
    return None
