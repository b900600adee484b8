"""The verdict's statistics (issue 20, point 1) on result files whose answer is known: two identical variants
are tied, a variant 30 points better is not, and the bootstrap agrees with scipy's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tunelab import metrics
from tunelab.lab.stats import paired_bootstrap, seed_interval


def em_rows(hits: np.ndarray) -> np.ndarray:
    """Exact-match statistics (hit, 1) per seed and row from a (seeds, rows) 0/1 array."""
    hits = np.atleast_2d(hits).astype(float)
    return np.stack([hits, np.ones_like(hits)], axis=-1)


def test_two_identical_variants_are_tied_and_one_30_points_better_is_not():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 60)) < 0.6).astype(float)
    better = a.copy()
    for seed in range(3):  # 18 of 60 rows more right: +30 points on every seed
        better[seed, np.flatnonzero(a[seed] == 0)[:18]] = 1
    v = paired_bootstrap({"a": em_rows(a), "a-again": em_rows(a), "better": em_rows(better)}, "exact_match")
    assert v.best == "better" and v.tied == ["better"]
    assert v.differences["a"].hi < 0 and v.differences["a"].mean == pytest.approx(-0.3, abs=0.01)
    v = paired_bootstrap({"a": em_rows(a), "a-again": em_rows(a)}, "exact_match")
    assert v.tied == ["a", "a-again"] and v.differences["a-again"].lo == v.differences["a-again"].hi == 0


def test_one_row_apart_on_60_is_tied_but_the_same_gap_on_every_row_of_600_is_not():
    rng = np.random.default_rng(2)
    a = (rng.random(60) < 0.9).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[0]] = 0  # one row worse: 1.7 points
    assert paired_bootstrap({"a": em_rows(a), "b": em_rows(b)}, "exact_match").tied == ["a", "b"]
    a = (rng.random(600) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[:60]] = 0  # 10 points worse, paired on 600 rows
    assert paired_bootstrap({"a": em_rows(a), "b": em_rows(b)}, "exact_match").tied == ["a"]


def test_the_interval_of_one_seeds_mean_agrees_with_scipys_bootstrap():
    rng = np.random.default_rng(3)
    hits = (rng.random(80) < 0.7).astype(float)
    v = paired_bootstrap({"x": em_rows(hits)}, "exact_match", resamples=4000)
    ref = scipy_stats.bootstrap(
        (hits,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95, rng=rng
    ).confidence_interval
    assert v.scores["x"].mean == pytest.approx(hits.mean())
    assert v.scores["x"].lo == pytest.approx(ref.low, abs=0.02) and v.scores["x"].hi == pytest.approx(
        ref.high, abs=0.02
    )


def test_seeds_that_disagree_widen_the_interval():
    rng = np.random.default_rng(4)
    rows = (rng.random(100) < 0.5).astype(float)
    steady = np.stack([rows, rows, rows])
    shaky = np.stack([rows, np.ones(100), np.zeros(100)])  # seeds at 50%, 100% and 0%
    v = paired_bootstrap({"steady": em_rows(steady), "shaky": em_rows(shaky)}, "exact_match")
    width = {k: s.hi - s.lo for k, s in v.scores.items()}
    assert width["shaky"] > 3 * width["steady"]


def test_a_corpus_metric_is_resampled_as_itself():
    hyps = ["the cat sat on the mat", "a dog ran", "hello there", "good morning to you"] * 5
    refs = ["the cat is on the mat", "the dog ran away", "hello there", "good morning"] * 5
    stats = metrics.row_stats("chrf", hyps, refs)[None]
    v = paired_bootstrap({"x": stats}, "chrf", resamples=500)
    assert v.scores["x"].mean == pytest.approx(metrics.compute("chrf", hyps, refs))
    assert v.scores["x"].lo < v.scores["x"].mean < v.scores["x"].hi


def test_forgetting_over_seeds_has_students_t_interval_and_none_for_one_seed():
    s = seed_interval([0.010, 0.012, 0.014])
    half = scipy_stats.t.ppf(0.975, 2) * 0.002 / np.sqrt(3)
    assert s.mean == pytest.approx(0.012) and s.hi - s.mean == pytest.approx(half)
    assert seed_interval([0.5]).lo is None


def test_one_number_per_variant_gives_no_interval_and_ranks_nothing_beyond_noise():
    one = {"a": np.array([[[0.8, 1.0]]]), "b": np.array([[[0.7, 1.0]]])}  # one seed each, no rows
    v = paired_bootstrap(one, "exact_match", by_rows=False)
    assert v.best == "a" and v.how == "no interval: one seed and no per-row answers"
    assert v.scores["a"].lo is None and v.differences["b"].mean == pytest.approx(-0.1)
