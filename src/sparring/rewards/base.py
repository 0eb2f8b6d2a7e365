"""The reward interface: a batch of (query, answer) pairs in, one score and one validity flag per pair out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RewardBatch:
    """Scores for a batch of pairs, in input order.

    scores: one float per pair (finite).
    valid:  False where the reward could not judge the pair (e.g. an unparseable query or an
            unparseable grader reply); the score there is a placeholder the reward documents (0.0
            unless stated), and the caller decides whether to use it or drop the pair.
    """

    scores: list[float]
    valid: list[bool]

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.valid):
            raise ValueError(f"{len(self.scores)} scores but {len(self.valid)} validity flags")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def num_invalid(self) -> int:
        return sum(not v for v in self.valid)


@runtime_checkable
class RewardFn(Protocol):
    """Anything that scores a batch of (query, answer) pairs: verifiers, reward models, judges."""

    def __call__(self, queries: list[str], answers: list[str]) -> RewardBatch: ...


def check_pairs(queries: Sequence[str], answers: Sequence[str]) -> None:
    """Raise TypeError/ValueError unless queries and answers are equally long sequences of str."""
    if isinstance(queries, str) or isinstance(answers, str):
        raise TypeError("queries and answers must be lists of strings, not a single string")
    if len(queries) != len(answers):
        raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
    for name, items in (("queries", queries), ("answers", answers)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] must be str, got {type(item).__name__}")


def score_one(reward_fn: RewardFn, query: str, answer: str) -> float:
    """Score a single pair; raise ValueError if the reward could not judge it."""
    batch = reward_fn([query], [answer])
    if len(batch) != 1:
        raise ValueError(f"reward returned {len(batch)} scores for one pair")
    if not batch.valid[0]:
        raise ValueError(
            f"the reward could not judge the pair (query={query[:80]!r}, answer={answer[:80]!r})"
        )
    return batch.scores[0]
