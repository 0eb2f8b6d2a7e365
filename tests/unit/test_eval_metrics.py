"""Exact metrics on hand-made cases: pass@k, bootstrap intervals, seed spread, distribution metrics."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from sparring.evaluation.metrics import bootstrap_ci, distribution_metrics, paired_bootstrap, pass_at_k, seed_spread


def test_pass_at_k_hand_cases_and_brute_force():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 3) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # = 0.5
    assert pass_at_k(5, 4, 2) == 1.0  # any 2 of 5 contain a correct one
    correct = [1, 0, 0, 1, 0, 0]  # brute force over every k-subset
    for k in range(1, 7):
        subsets = list(combinations(correct, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_prompts():
    small = [1.0, 0.0] * 10
    mean, lo, hi = bootstrap_ci(small, reps=500)
    assert mean == 0.5 and lo < 0.5 < hi
    _, lo2, hi2 = bootstrap_ci(small * 25, reps=500)
    assert hi2 - lo2 < (hi - lo) / 3  # ~1/sqrt(25) as wide
    assert bootstrap_ci([1.0] * 10, reps=50) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_sees_a_consistent_gain_that_unpaired_noise_hides():
    # b is a plus one solved prompt in every 10: a small gain, consistent over prompts.
    a = [1.0 if i % 2 else 0.0 for i in range(400)]
    b = [1.0 if (i % 2 or i % 10 == 0) else 0.0 for i in range(400)]
    diff, lo, hi = paired_bootstrap(b, a, reps=500)
    assert diff == pytest.approx(0.1) and lo > 0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_seed_spread():
    assert seed_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert seed_spread([0.5]) == (0.5, 0.0)


def test_distribution_metrics_hand_case():
    target = {"a": 0.5, "b": 0.25, "c": 0.25}
    m = distribution_metrics(["a", "a", "b", "x"], target)
    assert m["validity"] == 0.75 and m["coverage"] == pytest.approx(2 / 3)
    # p̂ = a .5, b .25, c 0, x .25 (off support) -> ½(0 + 0 + .25 + .25) = .25
    assert m["tv"] == pytest.approx(0.25)
    assert distribution_metrics(["a", "b", "c", "a"], target)["tv"] == pytest.approx(0.0)
    assert distribution_metrics(["x"] * 3, target) == {"validity": 0.0, "coverage": 0.0, "tv": 1.0}
