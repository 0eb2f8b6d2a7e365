"""Building blocks shared by the pairwise self-play losses (torch only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

PAIR_LOSS_KINDS = ("sigmoid", "hinge")


class LossOutput(NamedTuple):
    """What every loss returns.

    loss:    (B,) per-example loss; the training loop takes the mean.
    metrics: detached scalar tensors (batch means), named as they are logged.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def pair_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """ℓ applied to an already scaled margin: sigmoid → −log σ(u) = softplus(−u); hinge → max(0, 1 − u)."""
    if kind == "sigmoid":
        return F.softplus(-logits)
    if kind == "hinge":
        return torch.relu(1.0 - logits)
    raise ValueError(f"unknown pair loss kind {kind!r}; expected one of {PAIR_LOSS_KINDS}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob tensors must share one shape, got {shapes}")


def add_real_nll(out: LossOutput, policy_real: torch.Tensor, real_tokens: torch.Tensor | None,
                 coef: float) -> LossOutput:
    """``out`` plus coef · NLL(y | x), the real responses' per-token negative log-likelihood (RPO, Pang
    et al. 2024; TRL's ``rpo_alpha``, in TRL ≥ 1.0 ``loss_type=[…, "sft"]`` with ``loss_weights``).

        NLL = Σ_i −L_θ(y_i) / Σ_i |y_i|        (a token mean over the batch, as TRL computes it)

    policy_real (B,) summed log-probs L_θ(y_i), live; real_tokens (B,) |y_i|, the scored response tokens.
    NLL is not a sum of per-row terms, so row i carries the share B·(−L_θ(y_i)) / Σ_j |y_j|: the mean of
    the returned (B,) loss is mean ℓ + coef·NLL exactly. Adds the metric ``nll/real`` (NLL, detached).
    coef = 0 returns ``out`` itself, untouched (no term, no metric).
    """
    if coef == 0:
        return out
    if real_tokens is None:
        raise ValueError("an NLL term (nll_coef > 0) needs real_tokens, the token count of each real response")
    check_same_shape(policy_real=policy_real, real_tokens=real_tokens)
    total = real_tokens.to(policy_real.dtype).sum().clamp(min=1)  # Σ_i |y_i|
    share = -policy_real * (policy_real.shape[0] / total)  # (B,) mean over rows = NLL
    nll = (-policy_real.detach().sum() / total).detach()
    return LossOutput(out.loss + coef * share, {**out.metrics, "nll/real": nll})
