"""The Pareto front and the recommendation picks, on hand-made points (issue 10, point 6)."""

from __future__ import annotations

import pytest

from tunelab.lab.frontier import Point, pareto_front, recommend

POINTS = [
    #      name           score  forgetting  trainable     wall s
    Point("full", 0.90, 0.130, 134_000_000, 165.0),
    Point("lora", 0.88, 0.340, 4_900_000, 158.0),  # dominated by full: lower score, more forgetting
    Point("full+ewc", 0.85, 0.036, 134_000_000, 205.0),
    Point("full+retention", 0.88, 0.017, 134_000_000, 218.0),
    Point("layerwise", 0.70, 0.050, 14_000_000, 60.0),  # dominated by full+retention
    Point("zero-shot", 0.02, 0.0, 0, None),  # trains nothing: no forgetting at all
    Point("failed", None, None, None, None),  # a variant that failed: in no pick
]


def test_the_front_holds_exactly_the_points_nothing_dominates():
    assert pareto_front(POINTS) == ["full", "full+retention", "zero-shot"]


def test_equal_points_are_both_on_the_front_and_a_tie_in_one_metric_dominates():
    pts = [Point("a", 0.5, 0.1), Point("b", 0.5, 0.1), Point("c", 0.5, 0.2), Point("d", 0.4, 0.1)]
    assert pareto_front(pts) == ["a", "b"]  # c: same score, more forgetting; d: same forgetting, lower score


def test_points_without_forgetting_are_left_out_of_the_front():
    assert pareto_front([Point("x", 0.9, None), Point("y", 0.1, 0.5)]) == ["y"]


@pytest.mark.parametrize(
    "within, want",
    [
        # best 0.90: within 5% means score >= 0.855 -> full, lora, full+retention
        (5.0, {"best_score": "full", "least_forgetting": "full+retention", "cheapest": "lora", "fastest": "lora"}),
        # within 0%: only the best itself
        (0.0, {"best_score": "full", "least_forgetting": "full", "cheapest": "full", "fastest": "full"}),
        # within 25% (score >= 0.675): layer-wise joins; the zero-shot baseline never does
        (
            25.0,
            {
                "best_score": "full",
                "least_forgetting": "full+retention",
                "cheapest": "lora",
                "fastest": "layerwise",
            },
        ),
        # within 100%: everything scored, the baseline included (no training: cheapest and no forgetting)
        (
            100.0,
            {
                "best_score": "full",
                "least_forgetting": "zero-shot",
                "cheapest": "zero-shot",
                "fastest": "layerwise",
            },
        ),
    ],
)
def test_recommendations(within, want):
    assert recommend(POINTS, within) == want


def test_ties_break_the_same_way_every_time():
    pts = [Point("b", 0.8, 0.2, 10, 5.0), Point("a", 0.8, 0.2, 10, 5.0), Point("c", 0.8, 0.1, 20, 9.0)]
    got = recommend(pts)
    assert got["best_score"] == "c"  # equal score: less forgetting first
    assert got["cheapest"] == "a"  # equal everything: by name
    assert recommend(list(reversed(pts))) == got


def test_nothing_scored_and_bad_percentages():
    assert recommend([Point("f", None)]) == dict.fromkeys(
        ("best_score", "least_forgetting", "cheapest", "fastest")
    )
    with pytest.raises(ValueError, match="percentage from 0 to 100"):
        recommend(POINTS, within=150)
