"""LSP / LSP-Zero losses (Kuba et al. 2025, "Language Self-Play For Data-Free Training", arXiv 2509.07414).

One model plays two roles: the Challenger samples N queries q_i ~ π_θ(·|⟨cp⟩), the Solver samples G
answers a_i^j ~ π_θ(·|q_i), and a reward model scores R(q_i, a_i^j). Shapes: N queries, G answers
per query; ``(N, G)`` tensors are row-major, so flattening gives the order (i=0,j=0), (i=0,j=1), …

Rewards and advantages (eqs. 2–3, §3):

    V(q_i)   = (1/G) Σ_j R(q_i, a_i^j)                      query value (external reward R only)
    V̄        = (1/N) Σ_i V(q_i)
    LSP-Zero:  r_Sol = R                 r_Ch(q_i) = −V(q_i)
    LSP:       r_Sol = R + R_Q           r_Ch(q_i) = −V(q_i) + V_Q(q_i),   V_Q = (1/G) Σ_j R_Q
    A_Sol(q_i, a_i^j) = r_Sol(q_i, a_i^j) − (1/G) Σ_j' r_Sol(q_i, a_i^j')   (group baseline)
    A_Ch(q_i)         = r_Ch(q_i) − (1/N) Σ_k r_Ch(q_k)                      (batch baseline)

For LSP-Zero A_Ch(q_i) = V̄ − V(q_i) (eq. 3). Answers left out of training (``keep``, truncated answers
under ``generation.on_truncated=drop``) get A_Sol = 0 and leave the group means Σ_j' and V. R_Q ∈ {0..7} is the frozen reference model's self-reward
(see ``sparring.rewards.self_judge``). The paper uses no standard-deviation scaling; ``scale_std``
exists only for experiments and is off by default.

Update (eqs. 4–5, Algorithm 1), ⊥ = stop-gradient:

    L_Sol = −(1/(NG)) Σ_ij [ π(a|q)/⊥π(a|q) · A_Sol − β · KL-term ]
    L_Ch  = −(1/N)    Σ_i  [ π(q|cp)/⊥π(q|cp) · A_Ch − β · KL-term ]
    L     = L_Sol + α_Ch · L_Ch,  one gradient step per iteration.

π/⊥π = exp(log π − ⊥log π) has value exactly 1 and gradient ∇log π (DiCE / REINFORCE), so each
sequence contributes −A · ∇log π(sequence), a sum over its tokens (sequence-level probabilities).

KL estimator (spec B.11.2). Read literally, eqs. 4–5 put β·log(π/π_Ref) of *sampled* sequences into
the loss; with the samples fixed its expected gradient is β·E_π[∇log π] = 0, so it does not
regularise. ``kl_estimator`` makes the choice explicit:

    "k3"         loss += β · Σ_t k3_t,  k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1  (TRL's per-token
                 estimator); expected gradient = β ∇KL(π_Ref ‖ π) (reverse direction). Default.
    "reward"     advantage ← A − β·⊥(log π − log π_Ref) (score-function form); expected gradient
                 = β ∇KL(π ‖ π_Ref), the direction the paper writes.
    "k1_literal" loss += β·(log π − log π_Ref), the literal formula; its expected gradient is zero.
                 Kept so the tests can show that; do not train with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparring.losses.common import LossOutput, check_same_shape

KL_ESTIMATORS = ("k3", "reward", "k1_literal")


class LSPAdvantages(NamedTuple):
    """Rewards, values and advantages of one LSP batch (all detached, dtype of the rewards)."""

    solver: torch.Tensor  # (N, G) A_Sol
    challenger: torch.Tensor  # (N,) A_Ch
    query_value: torch.Tensor  # (N,) V(q) = mean_j R, external reward only
    quality_value: torch.Tensor | None  # (N,) V_Q(q) = mean_j R_Q, None for LSP-Zero
    solver_reward: torch.Tensor  # (N, G) R (+ R_Q)
    challenger_reward: torch.Tensor  # (N,) −V (+ V_Q)


def _as_float(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def _group_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:  # (N, G) -> (N, 1)
    if weight is None:
        return x.mean(dim=1, keepdim=True)
    return (x * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp(min=1)


def _group_std(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:  # (N, G) -> (N, 1), unbiased
    if weight is None:
        return x.std(dim=1, keepdim=True)
    var = (weight * (x - _group_mean(x, weight)) ** 2).sum(dim=1, keepdim=True)
    return (var / (weight.sum(dim=1, keepdim=True) - 1).clamp(min=1)).sqrt()


def lsp_advantages(
    rewards: torch.Tensor,  # (N, G) R(q_i, a_i^j)
    quality: torch.Tensor | None = None,  # (N, G) R_Q(q_i, a_i^j), self-reward (LSP); None → LSP-Zero
    *,
    scale_std: bool = False,
    eps: float = 1e-6,
    keep: torch.Tensor | None = None,  # (N, G) bool, False: the answer is out of its group; None: all in
) -> LSPAdvantages:
    """Group-relative Solver and batch-relative Challenger advantages (eqs. 2–3; LSP variant in §3).

    ``scale_std=True`` divides A_Sol by the unbiased per-query std of r_Sol (+eps) and A_Ch by the
    unbiased batch std of r_Ch (+eps), as GRPO/TRL do; the paper does not, so it is off by default.
    ``keep`` leaves answers out (truncated answers under ``generation.on_truncated=drop``): the group
    baseline, std, V and V_Q are taken over the kept answers and a left-out answer's A_Sol is 0. A query
    with no kept answer takes V and V_Q over all its answers (the caller gives them one reward).
    Raises ValueError when N < 2 or G < 2 (the advantages would be identically zero, spec B.11.6),
    on shape mismatch, or on non-finite rewards. Integer rewards are cast to the default float dtype.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (N, G), got {tuple(rewards.shape)}")
    n, g = rewards.shape
    if n < 2 or g < 2:
        raise ValueError(
            f"LSP needs N >= 2 queries and G >= 2 answers per query (got N={n}, G={g}): with G = 1 the "
            "Solver advantages and with N = 1 the Challenger advantages are identically zero"
        )
    rewards = _as_float("rewards", rewards)
    weight = None  # (N, G) 1 on the answers each group's statistics are taken over
    if keep is not None:
        if keep.shape != rewards.shape:
            raise ValueError(f"keep must have the shape of rewards {tuple(rewards.shape)}, got {tuple(keep.shape)}")
        keep = keep.to(torch.bool)
        weight = torch.where(keep.any(dim=1, keepdim=True), keep, torch.ones_like(keep)).to(rewards.dtype)
    query_value = _group_mean(rewards, weight).squeeze(1)  # (N,)
    quality_value = None
    solver_reward = rewards  # (N, G)
    challenger_reward = -query_value  # (N,)
    if quality is not None:
        if quality.shape != rewards.shape:
            raise ValueError(
                f"quality must have the shape of rewards {tuple(rewards.shape)}, got {tuple(quality.shape)}"
            )
        quality = _as_float("quality", quality).to(rewards.dtype)
        quality_value = _group_mean(quality, weight).squeeze(1)  # (N,)
        solver_reward = rewards + quality
        challenger_reward = -query_value + quality_value
    solver = solver_reward - _group_mean(solver_reward, weight)  # (N, G)
    challenger = challenger_reward - challenger_reward.mean()  # (N,)
    if scale_std:
        solver = solver / (_group_std(solver_reward, weight) + eps)
        challenger = challenger / (challenger_reward.std() + eps)
    if keep is not None:
        solver = solver * keep.to(solver.dtype)  # left-out answers: no advantage
    return LSPAdvantages(solver, challenger, query_value, quality_value, solver_reward, challenger_reward)


def group_signal(rewards: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # (N,) bool
    """Whether query i's group carries a solver signal: its kept rewards are not all equal,
    max_j R_ij ≠ min_j R_ij over j with keep_ij (a group with under two kept answers has none).

    With a 0/1 verifier of success rate p and G answers, P(signal) = 1 − p^G − (1 − p)^G."""
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep.to(torch.bool)
    high = torch.where(keep, rewards, torch.full_like(rewards, -torch.inf)).amax(dim=1)
    low = torch.where(keep, rewards, torch.full_like(rewards, torch.inf)).amin(dim=1)
    return (keep.sum(dim=1) >= 2) & (high > low)


def kl_k3(
    policy_token_logps: torch.Tensor,  # (B, T) log π_θ per token
    ref_token_logps: torch.Tensor,  # (B, T) log π_Ref per token, precomputed, detached here
    mask: torch.Tensor,  # (B, T) 1/True on response tokens
) -> torch.Tensor:  # (B,)
    """Per-sequence k3 KL: Σ_t mask_t · [exp(d_t) − d_t − 1], d_t = log π_Ref − log π_θ.

    Summed (not averaged) over the sequence's tokens, to match the sequence-level probabilities of
    eqs. 4–5 and the sum-of-token-log-probs convention used everywhere else. Each token term is ≥ 0
    and is exactly 0 (with zero gradient) where π_θ = π_Ref. Masked positions are zeroed before the
    exponential, so garbage log-probs on padding cannot produce inf/NaN. No clamping is applied.
    """
    check_same_shape(policy_token_logps=policy_token_logps, ref_token_logps=ref_token_logps, mask=mask)
    keep = mask.bool()
    d = torch.where(keep, ref_token_logps.detach() - policy_token_logps, torch.zeros_like(policy_token_logps))
    return (torch.exp(d) - d - 1.0).sum(dim=-1)


def reinforce_loss(
    seq_logps: torch.Tensor,  # (B,) log π_θ(sequence), token sum, with gradient
    advantages: torch.Tensor,  # (B,) detached here
    *,
    kl_coef: float,
    kl_estimator: str = "k3",
    kl_k3_per_seq: torch.Tensor | None = None,  # (B,) from kl_k3, needed for "k3" when kl_coef != 0
    seq_logps_ref: torch.Tensor | None = None,  # (B,) log π_Ref(sequence), for "reward"/"k1_literal"
) -> LossOutput:
    """Per-sequence REINFORCE loss with the DiCE ratio and a KL penalty (the bracket of eqs. 4–5).

        ratio_b = exp(logp_b − ⊥logp_b)                     (value 1, gradient ∇logp_b)
        "k3":         loss_b = −ratio_b·A_b + β·k3_b
        "reward":     loss_b = −ratio_b·(A_b − β·⊥(logp_b − logp_ref_b))
        "k1_literal": loss_b = −ratio_b·A_b + β·(logp_b − logp_ref_b)

    Returns the (B,) per-sequence loss (the common convention; the caller reduces). Metrics are
    unprefixed: ``pg_loss`` (mean of −A), ``kl`` (mean of the estimator's per-sequence value: k3 for
    "k3", logp − logp_ref otherwise), ``advantage_abs``, ``logps``.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    if seq_logps.dim() != 1:
        raise ValueError(f"seq_logps must have shape (B,), got {tuple(seq_logps.shape)}")
    check_same_shape(seq_logps=seq_logps, advantages=advantages)
    advantages = advantages.detach().to(seq_logps.dtype)
    ratio = torch.exp(seq_logps - seq_logps.detach())  # (B,) exactly 1 in value
    kl = torch.zeros_like(seq_logps)  # (B,) estimator value, for the loss and the metric
    if kl_estimator == "k3":
        if kl_k3_per_seq is not None:
            check_same_shape(seq_logps=seq_logps, kl_k3_per_seq=kl_k3_per_seq)
            kl = kl_k3_per_seq
        elif kl_coef != 0:
            raise ValueError("kl_estimator='k3' with kl_coef != 0 needs kl_k3_per_seq (see kl_k3)")
    elif seq_logps_ref is not None:
        check_same_shape(seq_logps=seq_logps, seq_logps_ref=seq_logps_ref)
        kl = seq_logps - seq_logps_ref.detach()
    elif kl_coef != 0:
        raise ValueError(f"kl_estimator={kl_estimator!r} with kl_coef != 0 needs seq_logps_ref")

    if kl_estimator == "reward":
        loss = -ratio * (advantages - kl_coef * kl.detach())
    else:  # "k3" and "k1_literal": the KL term sits in the loss itself
        loss = -ratio * advantages + kl_coef * kl
    metrics = {
        "pg_loss": (-advantages).mean().detach(),
        "kl": kl.detach().mean(),
        "advantage_abs": advantages.abs().mean(),
        "logps": seq_logps.detach().mean(),
    }
    return LossOutput(loss, metrics)


def lsp_loss(
    solver_logps: torch.Tensor,  # (N*G,) log π_θ(a_i^j | q_i), no ⟨cp⟩ in the context
    solver_adv: torch.Tensor,  # (N*G,) or (N, G) A_Sol, row-major like solver_logps
    challenger_logps: torch.Tensor,  # (N,) log π_θ(q_i | ⟨cp⟩)
    challenger_adv: torch.Tensor,  # (N,) A_Ch
    *,
    challenger_coef: float = 1.0,
    kl_coef: float,
    kl_estimator: str = "k3",
    solver_kl: torch.Tensor | None = None,  # (N*G,) k3 per answer (kl_k3), for "k3"
    challenger_kl: torch.Tensor | None = None,  # (N,) k3 per query, for "k3"
    solver_ref_logps: torch.Tensor | None = None,  # (N*G,) log π_Ref(a|q), for "reward"/"k1_literal"
    challenger_ref_logps: torch.Tensor | None = None,  # (N,) log π_Ref(q|⟨cp⟩), for "reward"/"k1_literal"
) -> LossOutput:
    """L_Self-Play = L_Sol + α_Ch · L_Ch (eqs. 4–5), see the module docstring for the terms.

    Unlike the other losses, ``loss`` is returned **already reduced to a scalar**: the mean over the
    N·G Solver sequences plus ``challenger_coef`` times the mean over the N Challenger queries, because
    the two roles have different batch sizes and normalisers (1/(NG) and 1/N). The training loop must
    not average it again. With ``challenger_coef == 0`` the Challenger term is left out entirely (GRPO
    without std scaling, spec B.12.10). The same β and estimator serve both roles.

    Metrics (detached): ``lsp/solver_loss``, ``lsp/challenger_loss``, ``lsp/kl_solver``,
    ``lsp/kl_challenger``, ``lsp/solver_advantage_abs``, ``lsp/challenger_advantage_abs``,
    ``lsp/solver_logps``, ``lsp/challenger_logps``.
    """
    if solver_adv.dim() == 2:
        solver_adv = solver_adv.reshape(-1)
    if challenger_logps.dim() != 1 or challenger_logps.numel() == 0:
        raise ValueError(f"challenger_logps must have shape (N,), got {tuple(challenger_logps.shape)}")
    n = challenger_logps.numel()
    if solver_logps.dim() != 1 or solver_logps.numel() % n != 0:
        raise ValueError(
            f"solver_logps must have shape (N*G,) with N={n} queries, got {tuple(solver_logps.shape)}"
        )
    solver = reinforce_loss(
        solver_logps,
        solver_adv,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_k3_per_seq=solver_kl,
        seq_logps_ref=solver_ref_logps,
    )
    challenger = reinforce_loss(
        challenger_logps,
        challenger_adv,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_k3_per_seq=challenger_kl,
        seq_logps_ref=challenger_ref_logps,
    )
    solver_term = solver.loss.mean()  # (1/(NG)) Σ_ij
    challenger_term = challenger.loss.mean()  # (1/N) Σ_i
    loss = solver_term + challenger_coef * challenger_term if challenger_coef != 0 else solver_term
    metrics = {
        "lsp/solver_loss": solver_term.detach(),
        "lsp/challenger_loss": challenger_term.detach(),
        "lsp/kl_solver": solver.metrics["kl"],
        "lsp/kl_challenger": challenger.metrics["kl"],
        "lsp/solver_advantage_abs": solver.metrics["advantage_abs"],
        "lsp/challenger_advantage_abs": challenger.metrics["advantage_abs"],
        "lsp/solver_logps": solver.metrics["logps"],
        "lsp/challenger_logps": challenger.metrics["logps"],
    }
    return LossOutput(loss, metrics)
