"""Exact evaluation metrics and their uncertainty (pure Python, no model).

- ``pass_at_k``: the unbiased estimator of Chen et al. 2021 (HumanEval) from n samples, c correct;
- ``bootstrap_ci`` / ``paired_bootstrap``: percentile bootstrap over prompts (paired: the same
  resampled prompts for both models, so the prompt-to-prompt variance cancels);
- ``seed_spread``: mean and sample standard deviation over seeds;
- ``distribution_metrics``: validity, coverage and total-variation distance of samples to a known
  target distribution (for tasks with many valid answers).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct) = 1 − C(n−c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _percentiles(values: list[float], alpha: float) -> tuple[float, float]:
    values = sorted(values)
    lo = values[int(math.floor(alpha / 2 * (len(values) - 1)))]
    hi = values[int(math.ceil((1 - alpha / 2) * (len(values) - 1)))]
    return lo, hi


def bootstrap_ci(scores: Sequence[float], *, reps: int = 2000, seed: int = 0, alpha: float = 0.05):
    """(mean, low, high): the mean of per-prompt scores and its percentile bootstrap interval."""
    n = len(scores)
    rng = random.Random(seed)
    means = [sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps)]
    return (sum(scores) / n, *_percentiles(means, alpha))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, reps: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean(a − b), low, high) over the same prompts: is model a better than model b?"""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same prompts: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], reps=reps, seed=seed, alpha=alpha)


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds; the deviation is 0 for a single seed."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def distribution_metrics(samples: Sequence[Hashable], target: dict[Hashable, float]) -> dict[str, float]:
    """Samples of one prompt against its exact target distribution (probabilities summing to 1).

    validity: the share of samples in the target's support; coverage: the share of the support seen
    at least once; tv: ½ Σ_a |p̂(a) − q(a)|, invalid samples counting as mass off the support.
    """
    n = len(samples)
    counts = Counter(samples)
    valid = sum(c for a, c in counts.items() if a in target)
    off_support = (n - valid) / n
    tv = 0.5 * (sum(abs(counts.get(a, 0) / n - q) for a, q in target.items()) + off_support)
    seen = sum(1 for a in target if a in counts)
    return {"validity": valid / n, "coverage": seen / len(target), "tv": tv}
