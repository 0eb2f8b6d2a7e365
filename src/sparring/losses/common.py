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
