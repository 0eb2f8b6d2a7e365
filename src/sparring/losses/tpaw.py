"""TPAW loss: team-based self-play with dual adaptive weighting (Li et al., ACL 2026, arXiv 2605.09922).

The formulas are reconstructed from a secondary summary of the paper (spec ``tpaw.md`` §A.5–A.7, A.9).
For each row (x, y, y′) and each team member j (a frozen earlier checkpoint θ_j):

    P_j(z) = λ · [L_θ(z) − L_θj(z)]                 implicit reward of z under player j
    m_j    = P_j(y) − P_j(y′)                        player j's margin
    α_j    = η if P_j(y) ≤ 0 else 1                  target response weighting (no gradient)
    β      = softmax_j(−γ · m_j)                     main player weighting (detached by default)
    loss   = Σ_j β_j · ℓ(α_j · P_j(y) − P_j(y′)),    ℓ(u) = softplus(−u) = −log σ(u)

Shapes: policy log-probs (B,); team log-probs (B, K), one column per team member, **column 0 is the
newest checkpoint θ_t** (the one that generated the latest y′), so player 0's reward is SPIN's reward.
The team log-probs are precomputed constants and are detached here; α never carries gradient.

Reductions: K = 1 and η = 1 give exactly ``spin_loss(…, kind="sigmoid")``. At the start of a round
(θ = θ_t) P_0(y) = 0, so α_0 = η ("≤ 0") and player 0's term is log 2 with gradient −½λ(η∇a − ∇b).

Note on β's gradient: every m_j contains the same policy term λ(L_θ(y) − L_θ(y′)); the rest depends
only on the frozen team. β is a softmax, invariant to a common shift, so ∂β/∂θ = 0 and
``detach_player_weights`` cannot change the loss or its gradient (up to rounding). The switch is kept
for the unconfirmed paper choice, not because it matters for these formulas.
"""

from __future__ import annotations

import torch

from sparring.losses.common import LossOutput, pair_loss


def tpaw_loss(
    policy_real: torch.Tensor,  # (B,) L_θ(y)
    policy_generated: torch.Tensor,  # (B,) L_θ(y′)
    team_real: torch.Tensor,  # (B, K) L_θj(y), column 0 = newest checkpoint θ_t, no gradient
    team_generated: torch.Tensor,  # (B, K) L_θj(y′), same columns, no gradient
    *,
    scale: float,  # λ
    eta: float,  # η, target weight when P_j(y) ≤ 0 (paper default 6; 1 disables it)
    gamma: float,  # γ, inverse temperature of the player softmax (paper default 0.5)
    detach_player_weights: bool = True,
    team_mask: torch.Tensor | None = None,  # (B, K) bool, True = player j scores row i
) -> LossOutput:
    """Per-example TPAW loss Σ_j β_j ℓ(α_j P_j(y) − P_j(y′)) and its metrics.

    ``team_mask`` selects which players score which row (None = every player scores every row, the
    spec's reading; a one-hot mask = each row only by the player that generated it). Masked players
    get β = 0 (softmax over the present players only) and their team entries are ignored, so they may
    hold any padding value, NaN included. Every row needs at least one present player.

    Metrics (detached means): ``logps/real``, ``logps/generated`` over all rows; ``rewards/real``,
    ``rewards/generated``, ``rewards/margins``, ``rewards/accuracies`` (strict >) from player 0 (SPIN's
    reward); per player j ``tpaw/player{j}/reward_real`` (P_j(y)), ``…/margin`` (m_j),
    ``…/target_weighted_frac`` (fraction with α_j = η), ``…/weight`` (β_j); ``tpaw/weight_entropy``
    (−Σ_j β_j log β_j, row mean). Player metrics average over the rows that player scores: a player
    scoring no row of the batch reports NaN (aggregate with a NaN-aware mean).
    """
    present = _check_inputs(policy_real, policy_generated, team_real, team_generated, team_mask)  # (B, K)
    # Masked entries may be padding (even NaN); zero them before any arithmetic, since a NaN in an
    # unselected torch.where branch would still poison the backward pass.
    team_real = torch.where(present, team_real.detach(), 0.0)  # (B, K)
    team_generated = torch.where(present, team_generated.detach(), 0.0)  # (B, K)

    reward_real = scale * (policy_real.unsqueeze(1) - team_real)  # (B, K) P_j(y)
    reward_generated = scale * (policy_generated.unsqueeze(1) - team_generated)  # (B, K) P_j(y′)
    margin = reward_real - reward_generated  # (B, K) m_j
    targeted = reward_real.detach() <= 0  # (B, K) α_j = η here
    target_weight = torch.where(targeted, eta, 1.0).to(reward_real.dtype)  # (B, K) α_j
    player_logits = (-gamma * margin).masked_fill(~present, float("-inf"))  # (B, K)
    player_weight = torch.softmax(player_logits, dim=1)  # (B, K) β, exactly 0 where masked
    if detach_player_weights:
        player_weight = player_weight.detach()
    player_loss = pair_loss(target_weight * reward_real - reward_generated, "sigmoid")  # (B, K)
    loss = (player_weight * player_loss).sum(dim=1)  # (B,)

    metrics = _metrics(
        policy_real, policy_generated, reward_real, reward_generated, targeted, player_weight, present
    )
    return LossOutput(loss, metrics)


def _check_inputs(
    policy_real: torch.Tensor,
    policy_generated: torch.Tensor,
    team_real: torch.Tensor,
    team_generated: torch.Tensor,
    team_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate shapes and return the (B, K) bool mask of present players."""
    if policy_real.dim() != 1 or policy_real.shape != policy_generated.shape:
        raise ValueError(
            "policy_real and policy_generated must both have shape (B,), got "
            f"{tuple(policy_real.shape)} and {tuple(policy_generated.shape)}"
        )
    batch = policy_real.shape[0]
    if team_real.dim() != 2 or team_real.shape != team_generated.shape or team_real.shape[0] != batch:
        raise ValueError(
            f"team_real and team_generated must both have shape (B, K) with B = {batch}, got "
            f"{tuple(team_real.shape)} and {tuple(team_generated.shape)}"
        )
    if team_real.shape[1] == 0:
        raise ValueError("the team is empty (K = 0); TPAW needs at least one player")
    if team_mask is None:
        return torch.ones(team_real.shape, dtype=torch.bool, device=team_real.device)
    if team_mask.dtype != torch.bool or team_mask.shape != team_real.shape:
        raise ValueError(
            f"team_mask must be a bool tensor of shape {tuple(team_real.shape)}, "
            f"got {team_mask.dtype} {tuple(team_mask.shape)}"
        )
    empty_rows = (~team_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"team_mask leaves rows {empty_rows} without any player")
    return team_mask


def _metrics(
    policy_real: torch.Tensor,  # (B,)
    policy_generated: torch.Tensor,  # (B,)
    reward_real: torch.Tensor,  # (B, K) P_j(y)
    reward_generated: torch.Tensor,  # (B, K) P_j(y′)
    targeted: torch.Tensor,  # (B, K) bool, α_j = η
    player_weight: torch.Tensor,  # (B, K) β
    present: torch.Tensor,  # (B, K) bool
) -> dict[str, torch.Tensor]:
    reward_real, reward_generated = reward_real.detach(), reward_generated.detach()
    player_weight = player_weight.detach()
    count = present.sum(dim=0)  # (K,) rows per player; 0 → NaN means below

    def player_mean(values: torch.Tensor) -> torch.Tensor:  # (B, K) → (K,)
        return torch.where(present, values.to(reward_real.dtype), 0.0).sum(dim=0) / count

    reward_real_mean = player_mean(reward_real)  # (K,)
    reward_generated_mean = player_mean(reward_generated)  # (K,)
    margin_mean = player_mean(reward_real - reward_generated)  # (K,)
    targeted_frac = player_mean(targeted)  # (K,)
    weight_mean = player_mean(player_weight)  # (K,)
    accuracy = player_mean(reward_real > reward_generated)  # (K,)
    entropy = -torch.special.xlogy(player_weight, player_weight).sum(dim=1)  # (B,)

    metrics = {
        "rewards/real": reward_real_mean[0],
        "rewards/generated": reward_generated_mean[0],
        "rewards/margins": margin_mean[0],
        "rewards/accuracies": accuracy[0],
        "logps/real": policy_real.detach().mean(),
        "logps/generated": policy_generated.detach().mean(),
        "tpaw/weight_entropy": entropy.mean(),
    }
    for j in range(present.shape[1]):
        metrics[f"tpaw/player{j}/reward_real"] = reward_real_mean[j]
        metrics[f"tpaw/player{j}/margin"] = margin_mean[j]
        metrics[f"tpaw/player{j}/target_weighted_frac"] = targeted_frac[j]
        metrics[f"tpaw/player{j}/weight"] = weight_mean[j]
    return metrics
