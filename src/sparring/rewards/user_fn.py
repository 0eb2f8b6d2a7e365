"""User-supplied reward functions named by an import spec, ``"package.module:function"``.

The function takes one pair and returns a number: ``fn(query: str, answer: str) -> float | None``.
``None`` means "could not judge this pair" and becomes ``valid=False`` with score 0.0; any other
non-number, and any non-finite number, is an error that names the offending pair.

What LSP makes of None (``algorithms.lsp.rollouts.score_rewards``): None for every answer of a query says the
query is invalid (e.g. it does not parse), and all its answers get ``lsp.reward.invalid_query_reward``
(the challenger's worst case; the solver learns nothing from equal rewards). None for some answers of
a query whose other answers were judged says those answers are unjudgeable: they get
``lsp.reward.unjudged_answer_reward`` (default 0.0, the lowest reward), never the top one.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable

from sparring.rewards.base import RewardBatch, check_pairs, score_one

SPEC_FORM = "'package.module:function' (attribute paths such as 'package.module:Class.method' also work)"


def _resolve(spec: str) -> Callable[[str, str], float | None]:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"bad reward function spec {spec!r}: expected {SPEC_FORM}")
    module_name, attr_path = (part.strip() for part in spec.split(":"))
    if not module_name or not attr_path or any(not p.isidentifier() for p in attr_path.split(".")):
        raise ValueError(f"bad reward function spec {spec!r}: expected {SPEC_FORM}")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only report "not found" for the module itself, not for a missing dependency inside it.
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ImportError(
                f"reward function spec {spec!r}: module {module_name!r} not found "
                "(is it installed or on sys.path?)"
            ) from err
        raise
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"reward function spec {spec!r}: {module_name!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(
            f"reward function spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable"
        )
    return obj


class UserReward:
    """Wrap a per-pair function ``(query, answer) -> float | None`` into the RewardFn protocol."""

    def __init__(self, fn: Callable[[str, str], float | None], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def __call__(self, queries: list[str], answers: list[str]) -> RewardBatch:
        check_pairs(queries, answers)
        scores: list[float] = []
        valid: list[bool] = []
        for query, answer in zip(queries, answers, strict=True):
            value = self.fn(query, answer)
            if value is None:
                scores.append(0.0)
                valid.append(False)
                continue
            # bool is accepted (a pass/fail verifier); strings and other objects are not.
            if not isinstance(value, numbers.Real) and not _is_scalar_array(value):
                raise TypeError(
                    f"reward function {self.name} returned {type(value).__name__} {value!r} for "
                    f"query={query!r}, answer={answer!r}; expected a real number or None"
                )
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(
                    f"reward function {self.name} returned non-finite {score} "
                    f"for query={query!r}, answer={answer!r}"
                )
            scores.append(score)
            valid.append(True)
        return RewardBatch(scores, valid)

    def score(self, query: str, answer: str) -> float:
        return score_one(self, query, answer)


def _is_scalar_array(value: object) -> bool:
    """numpy / torch 0-d arrays: anything with ``.item()`` giving a real number."""
    item = getattr(value, "item", None)
    if item is None or getattr(value, "ndim", None) != 0:
        return False
    return isinstance(item(), numbers.Real)


def load_user_reward(spec: str) -> UserReward:
    """Import ``"package.module:function"`` and wrap it as a RewardFn.

    Errors: ValueError (malformed spec), ImportError (module not found), AttributeError (no such
    attribute), TypeError (not callable).
    """
    return UserReward(_resolve(spec), name=spec)
