"""A program verifier for the built-in proving ground: R(q, a) = 1 for the exact answer, else 0.

LSP's challenger writes its own queries, so some will not be proving-ground tasks at all. Those pairs
come back ``valid=False`` with the placeholder score 0.0, for every answer of the query; the LSP loop
gives them ``lsp.reward.invalid_query_reward`` and counts the query (``lsp/invalid_query_frac``).
"""

from __future__ import annotations

from sparring.rewards.base import RewardBatch, check_pairs, score_one


class ProvingGroundVerifier:
    """RewardFn over ``sparring.tasks.check``: 1.0 right, 0.0 wrong, invalid when the query does not parse."""

    def __call__(self, queries: list[str], answers: list[str]) -> RewardBatch:
        from sparring.tasks import check

        check_pairs(queries, answers)
        verdicts = [check(q, a) for q, a in zip(queries, answers, strict=True)]
        return RewardBatch([1.0 if v else 0.0 for v in verdicts], [v is not None for v in verdicts])

    def score(self, query: str, answer: str) -> float:
        return score_one(self, query, answer)
