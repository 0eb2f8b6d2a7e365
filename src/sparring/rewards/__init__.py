"""Rewards for self-play: the RewardFn interface, HF reward models, user functions, the LSP self-judge,
and the verifiers held-out evaluation looks up by name (``registry``).

Importing this package does not import ``transformers``; ``HFRewardModel`` does so when built.
"""

from sparring.rewards.base import RewardBatch, RewardFn, check_pairs, score_one
from sparring.rewards.registry import Verifier
from sparring.rewards.reward_model import HFRewardModel
from sparring.rewards.self_judge import (
    SELF_REWARD_PROMPT,
    QualityScore,
    SelfJudge,
    SelfJudgeBatch,
    parse_quality_score,
)
from sparring.rewards.user_fn import UserReward, load_user_reward
from sparring.rewards.verifier import ProvingGroundVerifier

__all__ = [
    "SELF_REWARD_PROMPT",
    "HFRewardModel",
    "ProvingGroundVerifier",
    "QualityScore",
    "RewardBatch",
    "RewardFn",
    "SelfJudge",
    "SelfJudgeBatch",
    "UserReward",
    "Verifier",
    "check_pairs",
    "load_user_reward",
    "parse_quality_score",
    "score_one",
]
