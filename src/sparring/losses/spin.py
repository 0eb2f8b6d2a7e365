"""SPIN loss (Chen et al., ICML 2024, eq. 4.7).

    z_i  = [L_θ(y_i) − L_θt(y_i)] − [L_θ(y′_i) − L_θt(y′_i)]
    loss_i = ℓ(λ · z_i),   ℓ(u) = −log σ(u) ("sigmoid", the paper's logistic loss) or max(0, 1 − u) ("hinge")

L_φ(z) is the sum of response-token log-probs under φ (see ``sparring.logprobs``). θ_t is the
previous iterate: the opponent that generated y′ and the frozen reference. With ℓ = sigmoid this is
DPO's loss with chosen = real, rejected = generated and DPO-β = λ.

Extension, not the paper's method (off by default): ``nll_coef`` = c > 0 adds c·NLL(y | x), the real
responses' per-token negative log-likelihood over the batch, as RPO (Pang et al. 2024) and TRL's
``rpo_alpha`` do (``sparring.losses.common.add_real_nll``):

    mean_i loss_i = mean_i ℓ(λ · z_i) + c · Σ_i −L_θ(y_i) / Σ_i |y_i|
"""

from __future__ import annotations

import torch

from sparring.losses.common import LossOutput, add_real_nll, check_same_shape, pair_loss


def spin_loss(
    policy_real: torch.Tensor,  # (B,) L_θ(y)
    policy_generated: torch.Tensor,  # (B,) L_θ(y′)
    opponent_real: torch.Tensor,  # (B,) L_θt(y), precomputed, no gradient
    opponent_generated: torch.Tensor,  # (B,) L_θt(y′), precomputed, no gradient
    *,
    scale: float,
    kind: str = "sigmoid",
    nll_coef: float = 0.0,  # c of the NLL term on y (0 = the paper's loss, bit for bit)
    real_tokens: torch.Tensor | None = None,  # (B,) |y_i|, response tokens of each real row; needed when c > 0
) -> LossOutput:
    """Per-example SPIN loss ℓ(λ·z) and TRL-named metrics.

    The opponent tensors are detached here, so no gradient can reach them even if a caller passes
    live tensors. Metrics (detached batch means): ``rewards/real`` = λ(L_θ(y) − L_θt(y)),
    ``rewards/generated`` = λ(L_θ(y′) − L_θt(y′)), ``rewards/margins``, ``rewards/accuracies``
    (strict >), ``logps/real``, ``logps/generated``; with ``nll_coef`` > 0 also ``nll/real`` (the
    per-token NLL of y) and each row's loss carries its share of c·NLL (see ``add_real_nll``).
    """
    check_same_shape(
        policy_real=policy_real,
        policy_generated=policy_generated,
        opponent_real=opponent_real,
        opponent_generated=opponent_generated,
    )
    real_ratio = policy_real - opponent_real.detach()  # (B,)
    generated_ratio = policy_generated - opponent_generated.detach()  # (B,)
    logits = scale * (real_ratio - generated_ratio)  # (B,) λ·z
    loss = pair_loss(logits, kind)
    rewards_real = (scale * real_ratio).detach()
    rewards_generated = (scale * generated_ratio).detach()
    metrics = {
        "rewards/real": rewards_real.mean(),
        "rewards/generated": rewards_generated.mean(),
        "rewards/margins": (rewards_real - rewards_generated).mean(),
        "rewards/accuracies": (rewards_real > rewards_generated).float().mean(),
        "logps/real": policy_real.detach().mean(),
        "logps/generated": policy_generated.detach().mean(),
    }
    return add_real_nll(LossOutput(loss, metrics), policy_real, real_tokens, nll_coef)
