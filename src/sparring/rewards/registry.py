"""Verifiers by name, for held-out evaluation (``eval.verifier``): the registry and user functions.

    verifier("proving_ground")       # the built-in task's program check (ProvingGroundVerifier)
    verifier("mypkg.rewards:judge")  # a user function (query, answer) -> float | None (UserReward)

Each entry names the metric its mean score is reported as (``exact_match`` for the proving ground's
0/1 check; ``reward`` for anything else). A verifier of your own joins with ``register``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from sparring.rewards.base import RewardFn


class Verifier(NamedTuple):
    reward: RewardFn
    metric: str  # the key of its mean score in the evaluation's results


def _proving_ground() -> RewardFn:
    from sparring.rewards.verifier import ProvingGroundVerifier

    return ProvingGroundVerifier()


_registry: dict[str, tuple[Callable[[], RewardFn], str]] = {"proving_ground": (_proving_ground, "exact_match")}


def names() -> tuple[str, ...]:
    return tuple(_registry)


def register(name: str, factory: Callable[[], RewardFn], *, metric: str = "reward") -> None:
    """Make ``name`` a verifier: ``factory()`` returns its RewardFn; its mean score is reported as ``metric``."""
    if ":" in name:
        raise ValueError(f"a verifier name cannot hold ':' ({name!r}): that form names a user function")
    _registry[name] = (factory, metric)


def unregister(name: str) -> None:
    if name != "proving_ground":
        _registry.pop(name, None)


def metric_of(spec: str | None) -> str | None:
    """The key ``verifier(spec)`` reports its mean score as, without building it (None: no verifier)."""
    if spec in (None, "none"):
        return None
    return _registry[spec][1] if spec in _registry else "reward"


def verifier(spec: str) -> Verifier:
    """The RewardFn of a registered name, or of a user function ``"package.module:function"``."""
    if spec in _registry:
        factory, metric = _registry[spec]
        return Verifier(factory(), metric)
    if ":" in spec:
        from sparring.rewards.user_fn import load_user_reward

        return Verifier(load_user_reward(spec), "reward")
    raise ValueError(f"unknown verifier {spec!r}; verifiers: {', '.join(names())}, or 'package.module:function'")
