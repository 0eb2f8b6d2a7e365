"""T-SPIN loss (Wang et al., NeurIPS 2025, arXiv 2601.08198, eq. 7).

Per triplet (y real, y′ synthetic from θ_t, y₀ proto-synthetic from θ_0), with a = L_θ(y),
b = L_θ(y′), c = L_θ(y₀):

    loss_i = ℓ(α·(a − b)) + β·ℓ(α·(b − c))
             current advantage   historical advantage

ℓ(u) = −log σ(u) = softplus(−u) ("sigmoid", the paper's choice) or max(0, 1 − u) ("hinge"). α is the
scale and β ≥ 0 the history weight (β = 0 at iteration 0, 0.1 afterwards in the paper). Beware the
names: T-SPIN's α is SPIN's λ, and T-SPIN's β is not SPIN's/DPO's β.

There is no reference model: all three log-probs come from the policy being trained (shapes (B,)),
and θ_t, θ_0 only served as samplers of y′ and y₀. Nothing is detached in the loss; the metrics are.
With β = 0 this is reference-free SPIN with scale α (``spin_loss`` with zero opponent log-probs).
"""

from __future__ import annotations

import torch

from sparring.losses.common import LossOutput, check_same_shape, pair_loss


def tspin_loss(
    policy_real: torch.Tensor,  # (B,) a = L_θ(y)
    policy_generated: torch.Tensor,  # (B,) b = L_θ(y′)
    policy_proto: torch.Tensor,  # (B,) c = L_θ(y₀)
    *,
    scale: float,
    history_weight: float,
    kind: str = "sigmoid",
) -> LossOutput:
    """Per-example T-SPIN loss ℓ(α(a − b)) + β·ℓ(α(b − c)) and its metrics.

    ``scale`` = α, ``history_weight`` = β (must be ≥ 0). Metrics (detached batch means):
    ``logps/real``, ``logps/generated``, ``tspin/logps_proto``; ``tspin/current_margin`` = α(a − b),
    ``tspin/history_margin`` = α(b − c); ``tspin/current_loss`` = ℓ(α(a − b)), ``tspin/history_loss``
    = ℓ(α(b − c)) unweighted (so loss = current_loss + β·history_loss); ``rewards/accuracies`` =
    fraction a > b, ``tspin/history_accuracy`` = fraction b > c (both strict).
    """
    check_same_shape(policy_real=policy_real, policy_generated=policy_generated, policy_proto=policy_proto)
    if history_weight < 0:
        raise ValueError(f"history_weight (T-SPIN's β) must be >= 0, got {history_weight}")
    current_margin = scale * (policy_real - policy_generated)  # (B,) α(a − b)
    history_margin = scale * (policy_generated - policy_proto)  # (B,) α(b − c)
    current_loss = pair_loss(current_margin, kind)  # (B,)
    history_loss = pair_loss(history_margin, kind)  # (B,)
    loss = current_loss + history_weight * history_loss
    real, generated, proto = policy_real.detach(), policy_generated.detach(), policy_proto.detach()
    metrics = {
        "logps/real": real.mean(),
        "logps/generated": generated.mean(),
        "tspin/logps_proto": proto.mean(),
        "tspin/current_margin": current_margin.detach().mean(),
        "tspin/history_margin": history_margin.detach().mean(),
        "tspin/current_loss": current_loss.detach().mean(),
        "tspin/history_loss": history_loss.detach().mean(),
        "rewards/accuracies": (real > generated).float().mean(),
        "tspin/history_accuracy": (generated > proto).float().mean(),
    }
    return LossOutput(loss, metrics)
