"""The use cases' metrics (issue 20, point 5): each equals its library's own value on fixed strings, and its
per-row statistics resampled give the metric of the resampled rows (what the paired bootstrap relies on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab import metrics
from tunelab.cli import main

HYPS = [
    "The cat sat on the mat.",
    "Le chat est assis sur le tapis",
    "a dog ran away quickly",
    "Order shipped yesterday, tracking to follow",
    "",
]
REFS = [
    "The cat is sitting on the mat.",
    "Le chat est assis sur le tapis",
    "the dog ran away",
    "Your order shipped yesterday; tracking follows by email",
    "Nothing was said",
]


def test_chrf_and_bleu_are_sacrebleus_corpus_scores():
    assert metrics.compute("chrf", HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score / 100)
    assert metrics.compute("bleu", HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score / 100)


def test_rouge_l_is_rouge_scores_mean_f_measure():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS, strict=True)])
    assert metrics.compute("rouge_l", HYPS, REFS) == pytest.approx(want)


def test_exact_match_macro_f1_and_json_fields_on_hand_counted_rows():
    assert metrics.compute("exact_match", ["Paris.", " paris", "Rome"], ["Paris", "Paris", "Paris"]) == 2 / 3
    # pos: tp 1, fp 1 -> F1 2/3; neg: tp 1, fn 1 -> 2/3; neu: 1; "maybe" is no label: a miss for neg
    preds, refs = ["pos", "neg", "pos", "neu", "maybe"], ["pos", "neg", "neg", "neu", "neg"]
    f1_neg = 2 * 1 / (2 * 1 + 0 + 2)  # tp 1, fn 2
    assert metrics.compute("macro_f1", preds, refs, ["neg", "neu", "pos"]) == pytest.approx(
        (2 / 3 + f1_neg + 1) / 3
    )
    refs = [json.dumps({"category": "billing", "priority": "high"}), json.dumps({"order": "#1", "date": "x"})]
    preds = ['{"category": "Billing", "priority": "low"}', "not json at all"]
    assert metrics.compute("json_fields", preds, refs) == 1 / 4  # billing (case folded) of four fields


@pytest.mark.parametrize("name", metrics.NAMES)
def test_statistics_resampled_give_the_metric_of_the_resampled_rows(name):
    rng = np.random.default_rng(0)
    labels = sorted(set(REFS))
    stats = metrics.row_stats(name, HYPS, REFS, labels)
    for _ in range(5):
        pick = rng.integers(0, len(HYPS), len(HYPS))
        want = metrics.compute(name, [HYPS[i] for i in pick], [REFS[i] for i in pick], labels)
        assert float(metrics.total(name, stats[pick].sum(0))) == pytest.approx(want)


def test_the_default_metrics_follow_the_datas_shape():
    assert metrics.default_metrics("classification", ["a"]) == ["accuracy", "macro_f1"]
    assert metrics.default_metrics("prompt_completion", ['{"a": 1}', '{"b": 2}']) == ["exact_match", "json_fields"]
    assert metrics.default_metrics("prompt_completion", ["un chat noir dort sur le lit"])[0] == "chrf"
    assert metrics.default_metrics("prompt_completion", ["Paris", "42"])[0] == "exact_match"


class Eval:
    metrics, primary = None, None


def test_eval_metrics_and_primary_choose_what_is_computed_and_what_ranks():
    cfg = Eval()
    assert metrics.chosen(cfg, "prompt_completion", ["Paris"]) == (["exact_match", "chrf"], "exact_match")
    cfg.metrics, cfg.primary = ["bleu", "exact_match"], "rouge_l"
    assert metrics.chosen(cfg, "prompt_completion", ["x"]) == (["rouge_l", "bleu", "exact_match"], "rouge_l")
    cfg.metrics, cfg.primary = ["exact_match", "macro_f1"], None  # exact match of a label is accuracy
    assert metrics.chosen(cfg, "classification", ["pos"]) == (["accuracy", "macro_f1"], "accuracy")


def test_an_unknown_metric_is_refused_naming_the_file_line_key_and_what_is_allowed(
    tmp_path, tiny_llama, memo_data, capsys
):
    import yaml

    from conftest import tiny_config

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run")
    cfg["eval"] = {"metrics": ["chrf", "meteor"]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    (problem,) = [x for x in capsys.readouterr().err.splitlines() if "meteor" in x]  # one line per problem
    assert f"{path}:" in problem and "eval.metrics.1" in problem and "'rouge_l'" in problem


def test_the_translation_and_summary_tasks_are_generated_and_scored_as_free_text():
    from tunelab.builtin_tasks import make_summaries, make_translation

    for make in (make_translation, make_summaries):
        rows = make(60, seed=1)
        assert rows == make(60, seed=1) and rows != make(60, seed=2)  # the seed decides, nothing is downloaded
        assert metrics.default_metrics("prompt_completion", [r["completion"] for r in rows])[0] == "chrf"
    by_gender = {r["completion"] for r in make_translation(4000, seed=3)}
    assert "Je vois une voiture rouge." in by_gender and "Je vois un chien vert." in by_gender
    assert not any("une chien" in x or "un voiture" in x for x in by_gender)  # the article agrees
    (row,) = make_summaries(1, seed=4)
    assert row["completion"].split(" from ")[0] in row["prompt"] and len(row["prompt"]) > 3 * len(
        row["completion"]
    )
