"""Generation metrics for the guide's use cases, each defined by per-row *sufficient statistics* and a
function from their sum to the score, so that a comparison can resample rows (the paired bootstrap of
:mod:`tunelab.lab.stats`) and get the same number the library gives on the whole set.

=============  ==============================================================  ==========================
metric         what it is                                                      computed by
=============  ==============================================================  ==========================
exact_match    share of answers equal to the reference after normalisation     tunelab (``normalize``)
accuracy       exact match of a classification row's label                     tunelab
macro_f1       F1 per label, averaged over the labels seen in references or     tunelab (sklearn's
               answers (an answer that is no label counts as a miss)            ``average="macro"``)
chrf           corpus chrF (character 6-grams, β = 2), Popović 2015             ``sacrebleu.CHRF()``
bleu           corpus BLEU-4 with brevity penalty, Papineni et al. 2002         ``sacrebleu.BLEU()``
rouge_l        mean ROUGE-L F-measure (longest common subsequence) per row       ``rouge_score``
json_fields    share of the reference JSON object's fields the answer gets      tunelab
               right (an answer that is not a JSON object gets none)
=============  ==============================================================  ==========================

Every score is a fraction in [0, 1] (sacrebleu's 0–100 divided by 100), so that a report shows them all as
percentages. Normalisation (surrounding white space and a trailing full stop removed, case folded) applies
to exact match, accuracy, macro-F1 and JSON string fields, not to chrF, BLEU or ROUGE, which are defined on
the raw text.

The default set is chosen by the data's shape (:func:`default_metrics`): labels → accuracy and macro-F1;
JSON answers → exact match and per-field accuracy; free text (references of five words or more on average)
→ chrF, BLEU, ROUGE-L and exact match; short answers → exact match and chrF. The first is the *primary*
metric, the one that ranks a comparison, unless ``eval.primary`` names another.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


@dataclass(frozen=True)
class Metric:
    name: str
    #: (predictions, references, labels) -> per-row statistics, shape (rows, k)
    rows: Callable[[Sequence[str], Sequence[str], Sequence[str] | None], np.ndarray]
    #: statistics summed over rows, shape (..., k) -> the score, shape (...)
    total: Callable[[np.ndarray], np.ndarray]
    help: str


def _mean_total(s: np.ndarray) -> np.ndarray:
    return np.divide(s[..., 0], s[..., 1], out=np.zeros(s.shape[:-1]), where=s[..., 1] > 0)


def _hits(preds, refs, labels=None) -> np.ndarray:
    return np.array([[normalize(p) == normalize(r), 1.0] for p, r in zip(preds, refs, strict=True)], float)


def _label_index(text: str, labels: Sequence[str]) -> int:
    """A label's position in ``labels`` after normalisation; ``len(labels)`` for an answer that is no label."""
    folded = [normalize(x) for x in labels]
    t = normalize(text)
    return folded.index(t) if t in folded else len(labels)


def _f1_rows(preds, refs, labels) -> np.ndarray:
    """Per row, per label: true positive, false positive, false negative, and whether the label occurs in
    the reference or the answer (the labels sklearn's macro average runs over). The last label slot is
    "no label" (an answer outside the label set): it is never averaged over."""
    if not labels:
        labels = sorted({r for r in refs})
    n = len(labels) + 1
    out = np.zeros((len(preds), 4 * n))
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        pi, ri = _label_index(p, labels), _label_index(r, labels)
        if pi == ri:
            out[i, pi] = 1  # tp
        else:
            out[i, n + pi] = 1  # fp of what was answered
            out[i, 2 * n + ri] = 1  # fn of the reference
        out[i, 3 * n + pi] = out[i, 3 * n + ri] = 1
    return out


def _f1_total(s: np.ndarray) -> np.ndarray:
    n = s.shape[-1] // 4
    tp, fp, fn, seen = (s[..., k * n : (k + 1) * n - 1] for k in range(4))  # drop the "no label" slot
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = seen > 0
    count = present.sum(-1)
    return np.divide((f1 * present).sum(-1), count, out=np.zeros(count.shape), where=count > 0)


@cache
def _sacre(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    return CHRF() if name == "chrf" else BLEU()


def _sacre_rows(name: str):
    def rows(preds, refs, labels=None) -> np.ndarray:
        # sacrebleu's own per-sentence sufficient statistics; summed they give its corpus score
        return np.array(_sacre(name)._extract_corpus_statistics(list(preds), [list(refs)]), dtype=float)

    return rows


def _sacre_total(name: str):
    def total(s: np.ndarray) -> np.ndarray:
        flat = s.reshape(-1, s.shape[-1])
        m = _sacre(name)
        scores = [m._compute_score_from_stats([int(round(x)) for x in row]).score / 100 for row in flat]
        return np.array(scores).reshape(s.shape[:-1])

    return total


def _rouge_rows(preds, refs, labels=None) -> np.ndarray:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return np.array([[scorer.score(r, p)["rougeL"].fmeasure, 1.0] for p, r in zip(preds, refs, strict=True)])


def json_object(text: str) -> dict | None:
    """``text`` as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    return a == b


def _field_rows(preds, refs, labels=None) -> np.ndarray:
    out = np.zeros((len(preds), 2))
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        ref, answer = json_object(r), json_object(p) or {}
        if ref is None:  # a reference that is no JSON object: one field, the whole answer
            out[i] = [normalize(p) == normalize(r), 1]
            continue
        out[i] = [sum(k in answer and _same(answer[k], v) for k, v in ref.items()), max(len(ref), 1)]
    return out


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", _hits, _mean_total, "share of answers equal to the reference (normalised)"),
        Metric("accuracy", _hits, _mean_total, "share of labels answered right (exact match of a label)"),
        Metric("macro_f1", _f1_rows, _f1_total, "F1 per label, averaged over labels"),
        Metric("chrf", _sacre_rows("chrf"), _sacre_total("chrf"), "corpus chrF (sacrebleu), as a fraction"),
        Metric("bleu", _sacre_rows("bleu"), _sacre_total("bleu"), "corpus BLEU-4 (sacrebleu), as a fraction"),
        Metric("rouge_l", _rouge_rows, _mean_total, "mean ROUGE-L F-measure (rouge-score)"),
        Metric("json_fields", _field_rows, _mean_total, "share of the reference JSON's fields answered right"),
    )
}
NAMES = tuple(METRICS)


def row_stats(name: str, preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None):
    """Per-row sufficient statistics of metric ``name``: shape (rows, k)."""
    return METRICS[name].rows(preds, refs, labels)


def total(name: str, stats: np.ndarray) -> np.ndarray:
    """Metric ``name`` from statistics summed over rows (any leading shape)."""
    return METRICS[name].total(np.asarray(stats, dtype=float))


def compute(name: str, preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Metric ``name`` over all rows."""
    return float(total(name, row_stats(name, preds, refs, labels).sum(0)))


def default_metrics(fmt: str, references: Sequence[str]) -> list[str]:
    """The metrics a split of this shape is scored with, primary first."""
    if fmt == "classification":
        return ["accuracy", "macro_f1"]
    refs = [r for r in references if r is not None]
    if refs and all(json_object(r) is not None for r in refs):
        return ["exact_match", "json_fields"]
    if refs and sum(len(r.split()) for r in refs) / len(refs) >= 5:
        return ["chrf", "bleu", "rouge_l", "exact_match"]
    return ["exact_match", "chrf"]


def chosen(eval_cfg, fmt: str, references: Sequence[str]) -> tuple[list[str], str]:
    """The metrics to compute and the primary one, from ``eval.metrics`` / ``eval.primary`` or the data's
    shape. ``exact_match`` and ``accuracy`` are one test under two names: classification rows report it as
    accuracy, other rows as exact match, whichever name the config used."""
    alias = {"exact_match": "accuracy"} if fmt == "classification" else {"accuracy": "exact_match"}
    names = [alias.get(n, n) for n in (getattr(eval_cfg, "metrics", None) or default_metrics(fmt, references))]
    primary = getattr(eval_cfg, "primary", None)
    primary = alias.get(primary, primary) if primary else names[0]
    names = list(dict.fromkeys([primary, *names]))
    return names, primary


METRIC_NAMES = {
    "exact_match": "exact match", "accuracy": "accuracy", "macro_f1": "macro-F1", "chrf": "chrF", "bleu": "BLEU",
    "rouge_l": "ROUGE-L", "json_fields": "JSON fields right",
}  # fmt: skip


def metric_name(metric: str | None) -> str:
    if not metric:
        return "score"
    avg = metric.startswith("average ")
    name = METRIC_NAMES.get(metric.removeprefix("average "), metric.replace("_", " "))
    return f"average {name}" if avg else name
