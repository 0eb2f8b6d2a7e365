"""LSP losses: hand-computed values, gradients, invariances, reductions (spec lsp.md B.4–B.12)."""

from __future__ import annotations

import math

import pytest
import torch

from sparring.losses.lsp import KL_ESTIMATORS, kl_k3, lsp_advantages, lsp_loss, reinforce_loss

F64 = torch.float64


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# Hand-computed example (N = 3 queries, G = 2 answers):
#   R   = [[1, 3], [2, 6], [0, 0]]  → V = [2, 4, 0], V̄ = 2
#   LSP-Zero: A_Sol = [[-1, 1], [-2, 2], [0, 0]], A_Ch = V̄ − V = [0, -2, 2]
#   R_Q = [[7, 5], [0, 2], [3, 3]]  → V_Q = [6, 1, 3]
#   LSP: r_Sol = R + R_Q = [[8, 8], [2, 8], [3, 3]] → A_Sol = [[0, 0], [-3, 3], [0, 0]]
#        r_Ch = −V + V_Q = [4, -3, 3], mean 4/3 → A_Ch = [8/3, -13/3, 5/3]
R = torch.tensor([[1.0, 3.0], [2.0, 6.0], [0.0, 0.0]], dtype=F64)
RQ = torch.tensor([[7.0, 5.0], [0.0, 2.0], [3.0, 3.0]], dtype=F64)


def random_rewards(n: int = 5, g: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, g, generator=gen, dtype=F64) * 3.0
    quality = torch.randint(0, 8, (n, g), generator=gen).to(F64)
    return rewards, quality


# ---------------------------------------------------------------- advantages


def test_lsp_zero_hand_computed():
    adv = lsp_advantages(R)
    torch.testing.assert_close(adv.query_value, t(2, 4, 0), rtol=0, atol=1e-15)
    torch.testing.assert_close(adv.solver, torch.tensor([[-1.0, 1.0], [-2.0, 2.0], [0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(adv.challenger, t(0, -2, 2), rtol=0, atol=1e-15)
    torch.testing.assert_close(adv.challenger_reward, t(-2, -4, 0))
    torch.testing.assert_close(adv.solver_reward, R)
    assert adv.quality_value is None


def test_lsp_hand_computed():
    adv = lsp_advantages(R, RQ)
    torch.testing.assert_close(adv.quality_value, t(6, 1, 3))
    torch.testing.assert_close(
        adv.solver_reward, torch.tensor([[8.0, 8.0], [2.0, 8.0], [3.0, 3.0]], dtype=F64)
    )
    torch.testing.assert_close(adv.solver, torch.tensor([[0.0, 0.0], [-3.0, 3.0], [0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(adv.challenger_reward, t(4, -3, 3))
    torch.testing.assert_close(adv.challenger, t(8 / 3, -13 / 3, 5 / 3), rtol=0, atol=1e-14)
    # V is the mean of the external reward only, not of R + R_Q.
    torch.testing.assert_close(adv.query_value, t(2, 4, 0))


@pytest.mark.parametrize("with_quality", [False, True])
def test_advantages_sum_to_zero(with_quality):
    rewards, quality = random_rewards()
    adv = lsp_advantages(rewards, quality if with_quality else None)
    torch.testing.assert_close(adv.solver.sum(dim=1), torch.zeros(5, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.challenger.sum(), torch.zeros((), dtype=F64), rtol=0, atol=1e-12)
    assert adv.solver.abs().sum() > 0 and adv.challenger.abs().sum() > 0


def test_lsp_zero_is_zero_sum_per_query():
    rewards, _ = random_rewards(seed=1)
    adv = lsp_advantages(rewards)
    solver_mean_reward = adv.solver_reward.mean(dim=1)
    torch.testing.assert_close(adv.challenger_reward + solver_mean_reward, torch.zeros(5, dtype=F64))
    # A_Ch = V̄ − V: a query on which the Solver scores below average gets a positive advantage.
    torch.testing.assert_close(adv.challenger, adv.query_value.mean() - adv.query_value)
    hardest = adv.query_value.argmin()
    assert adv.challenger[hardest] > 0


def test_lsp_payoff_sum_is_twice_quality_value():
    rewards, quality = random_rewards(seed=2)
    adv = lsp_advantages(rewards, quality)
    payoff = adv.solver_reward.mean(dim=1) + adv.challenger_reward
    torch.testing.assert_close(payoff, 2 * quality.mean(dim=1))
    assert payoff.abs().sum() > 0  # not zero-sum any more


def test_self_reward_off_is_lsp_zero():
    rewards, _ = random_rewards(seed=3)
    zero = lsp_advantages(rewards)
    with_zero_quality = lsp_advantages(rewards, torch.zeros_like(rewards))
    torch.testing.assert_close(zero.solver, with_zero_quality.solver)
    torch.testing.assert_close(zero.challenger, with_zero_quality.challenger)


@pytest.mark.parametrize("shift_r, shift_q", [(5.0, 0.0), (0.0, -2.0), (-7.5, 3.0)])
def test_constant_shift_leaves_advantages_unchanged(shift_r, shift_q):
    rewards, quality = random_rewards(seed=4)
    base = lsp_advantages(rewards, quality)
    shifted = lsp_advantages(rewards + shift_r, quality + shift_q)
    torch.testing.assert_close(shifted.solver, base.solver)
    torch.testing.assert_close(shifted.challenger, base.challenger)
    # ...while the rewards themselves did move (the test could fail).
    assert not torch.allclose(shifted.solver_reward, base.solver_reward)


def test_no_std_scaling_by_default():
    rewards, quality = random_rewards(seed=5)
    base = lsp_advantages(rewards, quality)
    scaled = lsp_advantages(10 * rewards, 10 * quality)
    torch.testing.assert_close(scaled.solver, 10 * base.solver)
    torch.testing.assert_close(scaled.challenger, 10 * base.challenger)


def test_scale_std_hand_computed():
    rewards = torch.tensor([[1.0, 3.0], [2.0, 6.0]], dtype=F64)
    eps = 1e-6
    adv = lsp_advantages(rewards, scale_std=True, eps=eps)
    # per-query unbiased std: √2 and 2√2; r_Ch = [-2, -4] → A_Ch = [1, -1], unbiased std √2
    s2 = math.sqrt(2.0)
    expected_solver = torch.tensor(
        [[-1 / (s2 + eps), 1 / (s2 + eps)], [-2 / (2 * s2 + eps), 2 / (2 * s2 + eps)]]
    )
    torch.testing.assert_close(adv.solver, expected_solver.to(F64))
    torch.testing.assert_close(adv.challenger, t(1 / (s2 + eps), -1 / (s2 + eps)))
    # scale invariant once std-normalised
    adv10 = lsp_advantages(10 * rewards, scale_std=True, eps=0.0)
    torch.testing.assert_close(adv10.solver, lsp_advantages(rewards, scale_std=True, eps=0.0).solver)


def test_keep_mask_hand_computed():
    # Answers out of the group (on_truncated=drop) leave its baseline and get a zero advantage:
    #   R = [[1, 3, 9], [2, 6, 4], [5, 7, 0]], keep = [[T, T, F], [T, T, T], [F, F, F]]
    #   V = [2, 4, 4] (a group with no kept answer falls back to the mean of all its rewards)
    #   R_Q = [[1, 1, 7], [0, 0, 0], [2, 2, 2]] → V_Q = [1, 0, 2]
    #   A_Sol = [[-1, 1, 0], [-2, 2, 0], [0, 0, 0]]; r_Ch = [-1, -4, -2], mean -7/3 → A_Ch = [4/3, -5/3, 1/3]
    rewards = torch.tensor([[1.0, 3.0, 9.0], [2.0, 6.0, 4.0], [5.0, 7.0, 0.0]], dtype=F64)
    quality = torch.tensor([[1.0, 1.0, 7.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=F64)
    keep = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    adv = lsp_advantages(rewards, quality, keep=keep)
    torch.testing.assert_close(adv.query_value, t(2, 4, 4))
    torch.testing.assert_close(adv.quality_value, t(1, 0, 2))
    torch.testing.assert_close(adv.solver, torch.tensor([[-1.0, 1.0, 0.0], [-2.0, 2.0, 0.0], [0.0] * 3], dtype=F64))
    torch.testing.assert_close(adv.challenger, t(4 / 3, -5 / 3, 1 / 3))
    # an all-True mask is no mask; std scaling stays finite with one kept answer
    full = lsp_advantages(rewards, quality, keep=torch.ones(3, 3, dtype=torch.bool))
    torch.testing.assert_close(full.solver, lsp_advantages(rewards, quality).solver)
    one = torch.tensor([[True, False, False], [True, True, True], [True, True, False]])
    scaled = lsp_advantages(rewards, keep=one, scale_std=True)
    assert torch.isfinite(scaled.solver).all() and scaled.solver[0].abs().max() == 0
    with pytest.raises(ValueError, match="keep must have the shape"):
        lsp_advantages(rewards, keep=torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (1, 1)])
def test_degenerate_group_sizes_raise(shape):
    with pytest.raises(ValueError, match="N >= 2 queries and G >= 2"):
        lsp_advantages(torch.ones(shape, dtype=F64))


def test_bad_shapes_and_values_raise():
    with pytest.raises(ValueError, match=r"shape \(N, G\)"):
        lsp_advantages(torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="quality must have the shape"):
        lsp_advantages(torch.ones(3, 2, dtype=F64), torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="finite"):
        lsp_advantages(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=F64))


def test_integer_quality_is_accepted():
    adv = lsp_advantages(R, RQ.to(torch.int64))
    torch.testing.assert_close(adv.challenger, t(8 / 3, -13 / 3, 5 / 3))
    assert adv.solver.dtype == F64


# ---------------------------------------------------------------- k3


def test_k3_hand_computed_and_masked():
    policy = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]], dtype=F64)
    ref = torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]], dtype=F64)  # padding garbage
    mask = torch.tensor([[1, 1, 0]])
    # token 1: d = log 2 → 2 − log 2 − 1; token 2: d = 0 → 0; token 3 masked out
    torch.testing.assert_close(kl_k3(policy, ref, mask), t(1 - math.log(2.0)))


def test_k3_is_zero_with_zero_gradient_at_reference():
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(3, 5, generator=gen, dtype=F64).log_softmax(-1).requires_grad_(True)
    ref = policy.detach().clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    k3 = kl_k3(policy, ref, mask)
    assert torch.equal(k3, torch.zeros(3, dtype=F64))
    (grad,) = torch.autograd.grad(k3.sum(), policy)
    assert torch.equal(grad, torch.zeros_like(grad))
    # and it is positive away from the reference
    assert (kl_k3(policy + 0.1, ref, mask) > 0).all()


# ---------------------------------------------------------------- REINFORCE / LSP loss


def test_ratio_forward_value_is_exactly_one():
    logps = t(-3.7, -120.25, -0.001).requires_grad_(True)
    adv = t(0.3, -1.2, 2.0)
    out = reinforce_loss(logps, adv, kl_coef=0.0)
    assert torch.equal(out.loss, -adv)  # −ratio·A with ratio == 1 exactly


def test_lsp_loss_hand_computed_value_and_metrics():
    solver_logps = t(-1, -2, -3, -4)
    solver_adv = t(1, 0, 0, 0)
    challenger_logps = t(-5, -6)
    challenger_adv = t(0.5, 0)
    out = lsp_loss(
        solver_logps,
        solver_adv,
        challenger_logps,
        challenger_adv,
        challenger_coef=0.5,
        kl_coef=0.05,
        kl_estimator="k3",
        solver_kl=t(0.1, 0.2, 0.3, 0.4),
        challenger_kl=t(0.5, 0.7),
    )
    # solver: mean(−A + β·k3) = (−1 + 0.05·1.0)/4 = −0.2375; challenger: (−0.5 + 0.05·1.2)/2 = −0.22
    assert out.loss.dim() == 0
    torch.testing.assert_close(out.loss, torch.tensor(-0.2375 + 0.5 * -0.22, dtype=F64))
    m = out.metrics
    torch.testing.assert_close(m["lsp/solver_loss"], torch.tensor(-0.2375, dtype=F64))
    torch.testing.assert_close(m["lsp/challenger_loss"], torch.tensor(-0.22, dtype=F64))
    torch.testing.assert_close(m["lsp/kl_solver"], torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(m["lsp/kl_challenger"], torch.tensor(0.6, dtype=F64))
    torch.testing.assert_close(m["lsp/solver_advantage_abs"], torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(m["lsp/challenger_advantage_abs"], torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(m["lsp/solver_logps"], torch.tensor(-2.5, dtype=F64))
    torch.testing.assert_close(m["lsp/challenger_logps"], torch.tensor(-5.5, dtype=F64))
    assert all(not v.requires_grad for v in m.values())


def test_policy_gradient_scaling_per_role():
    n, g, alpha = 3, 2, 0.7
    adv = lsp_advantages(R, RQ)
    solver_logps = torch.linspace(-5, -1, n * g, dtype=F64).requires_grad_(True)
    challenger_logps = t(-9, -8, -7).requires_grad_(True)
    out = lsp_loss(
        solver_logps, adv.solver, challenger_logps, adv.challenger, challenger_coef=alpha, kl_coef=0.0
    )
    g_sol, g_ch = torch.autograd.grad(out.loss, (solver_logps, challenger_logps))
    torch.testing.assert_close(g_sol, -adv.solver.reshape(-1) / (n * g))
    torch.testing.assert_close(g_ch, -alpha * adv.challenger / n)
    assert g_sol.abs().sum() > 0 and g_ch.abs().sum() > 0


def test_k3_term_gradient_scaling():
    solver_kl = t(0.1, 0.2, 0.3, 0.4).requires_grad_(True)
    challenger_kl = t(0.5, 0.7).requires_grad_(True)
    solver_logps, solver_adv = t(-1, -2, -3, -4), t(1, -1, 1, -1)
    kls = {"solver_kl": solver_kl, "challenger_kl": challenger_kl}
    out = lsp_loss(solver_logps, solver_adv, t(-5, -6), t(1, -1), challenger_coef=2.0, kl_coef=0.05, **kls)
    g_s, g_c = torch.autograd.grad(out.loss, (solver_kl, challenger_kl))
    torch.testing.assert_close(g_s, torch.full((4,), 0.05 / 4, dtype=F64))
    torch.testing.assert_close(g_c, torch.full((2,), 2.0 * 0.05 / 2, dtype=F64))


def test_reward_estimator_folds_kl_into_advantage():
    logps = t(-1.0, -2.0, -3.0).requires_grad_(True)
    ref = t(-1.5, -2.0, -2.0)
    adv = t(0.5, -0.25, 1.0)
    beta = 0.1
    out = reinforce_loss(logps, adv, kl_coef=beta, kl_estimator="reward", seq_logps_ref=ref)
    # value: −(A − β(logp − ref)) = [−0.5 + 0.05, 0.25, −1 − 0.1]
    torch.testing.assert_close(out.loss, t(-0.45, 0.25, -1.1))
    (grad,) = torch.autograd.grad(out.loss.sum(), logps)
    torch.testing.assert_close(grad, t(-0.45, 0.25, -1.1))  # −(A − β⊥(logp − ref)) · ∇logp
    torch.testing.assert_close(out.metrics["kl"], torch.tensor(-1 / 6, dtype=F64))  # mean of [0.5, 0, −1]


def test_k1_literal_is_the_literal_formula():
    logps = t(-1.0, -2.0).requires_grad_(True)
    out = reinforce_loss(
        logps, t(1.0, 1.0), kl_coef=0.1, kl_estimator="k1_literal", seq_logps_ref=t(-2.0, -1.0)
    )
    torch.testing.assert_close(out.loss, t(-1.0 + 0.1, -1.0 - 0.1))
    (grad,) = torch.autograd.grad(out.loss.sum(), logps)
    torch.testing.assert_close(grad, t(-1.0 + 0.1, -1.0 + 0.1))


def test_all_kl_terms_zero_at_reference():
    logps = t(-1.0, -2.5, -0.3)
    adv = t(0.2, -0.1, -0.1)
    base = reinforce_loss(logps, adv, kl_coef=0.0)
    token = torch.stack([logps / 2, logps / 2], dim=1)
    k3 = kl_k3(token, token.clone(), torch.ones_like(token))
    for est in KL_ESTIMATORS:
        out = reinforce_loss(
            logps, adv, kl_coef=0.05, kl_estimator=est, kl_k3_per_seq=k3, seq_logps_ref=logps
        )
        assert torch.equal(out.loss, base.loss)
        assert out.metrics["kl"].item() == 0.0


def test_reinforce_loss_errors():
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        reinforce_loss(x, x, kl_coef=0.1, kl_estimator="k2")
    with pytest.raises(ValueError, match="needs kl_k3_per_seq"):
        reinforce_loss(x, x, kl_coef=0.1, kl_estimator="k3")
    with pytest.raises(ValueError, match="needs seq_logps_ref"):
        reinforce_loss(x, x, kl_coef=0.1, kl_estimator="reward")
    with pytest.raises(ValueError, match="share one shape"):
        reinforce_loss(x, t(1.0, 2.0, 3.0), kl_coef=0.0)
    with pytest.raises(ValueError, match="N\\*G"):
        lsp_loss(t(-1, -2, -3), t(0, 0, 0), t(-1, -2), t(0, 0), kl_coef=0.0)


# ---------------------------------------------------------------- KL estimator trap (B.11.2)


def _expected_kl_gradients(estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On a categorical toy π = softmax(θ) over 4 outcomes, E_{a~π}[∇_θ loss(a)] by enumeration.

    Each outcome is one sampled "sequence" of one token; samples are held fixed (the gradient flows
    only through log π(a)), the expectation weights ⊥π(a). Returns (expected gradient, ∇KL(π‖ref),
    ∇KL(ref‖π)).
    """
    theta = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=F64, requires_grad=True)
    ref_logp = torch.tensor([0.0, 0.5, -0.5, 0.2], dtype=F64).log_softmax(-1)
    logp = theta.log_softmax(-1)  # (4,) every outcome, one token each
    weights = logp.exp().detach()
    k3 = kl_k3(logp[:, None], ref_logp[:, None], torch.ones(4, 1))
    out = reinforce_loss(
        logp,
        torch.zeros(4, dtype=F64),
        kl_coef=1.0,
        kl_estimator=estimator,
        kl_k3_per_seq=k3,
        seq_logps_ref=ref_logp,
    )
    (expected,) = torch.autograd.grad((weights * out.loss).sum(), theta)
    p = theta.softmax(-1)
    (forward_kl,) = torch.autograd.grad((p * (theta.log_softmax(-1) - ref_logp)).sum(), theta)
    (reverse_kl,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - theta.log_softmax(-1))).sum(), theta)
    return expected, forward_kl, reverse_kl


def test_literal_k1_has_zero_expected_gradient():
    expected, forward_kl, _ = _expected_kl_gradients("k1_literal")
    torch.testing.assert_close(expected, torch.zeros(4, dtype=F64), rtol=0, atol=1e-15)
    assert forward_kl.abs().max() > 1e-2  # there is a KL gradient it fails to follow


def test_reward_estimator_expected_gradient_is_forward_kl():
    expected, forward_kl, reverse_kl = _expected_kl_gradients("reward")
    torch.testing.assert_close(expected, forward_kl, rtol=0, atol=1e-14)
    assert not torch.allclose(forward_kl, reverse_kl)


def test_k3_expected_gradient_is_reverse_kl():
    expected, forward_kl, reverse_kl = _expected_kl_gradients("k3")
    torch.testing.assert_close(expected, reverse_kl, rtol=0, atol=1e-14)
    assert not torch.allclose(forward_kl, reverse_kl)


# ---------------------------------------------------------------- GRPO reduction (B.12.10)


def test_challenger_off_reduces_to_grpo():
    """α_Ch = 0: LSP's Solver update equals a hand-written GRPO (no std, dr_grpo-style token sum, k3)."""
    n, g, tokens, beta = 2, 3, 5, 0.05
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(n, g, generator=gen, dtype=F64)
    token_logps = (-torch.rand(n * g, tokens, generator=gen, dtype=F64) * 3).requires_grad_(True)
    ref_token_logps = token_logps.detach() + 0.2 * torch.randn(n * g, tokens, generator=gen, dtype=F64)
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(F64)

    # Hand-written GRPO, TRL-style per-token form, summed over tokens, divided by the batch size.
    group_adv = rewards - rewards.mean(dim=1, keepdim=True)  # no std scaling
    a = group_adv.reshape(-1, 1)
    d = ref_token_logps - token_logps
    per_token = -torch.exp(token_logps - token_logps.detach()) * a + beta * (torch.exp(d) - d - 1)
    grpo = (per_token * mask).sum() / (n * g)
    (grpo_grad,) = torch.autograd.grad(grpo, token_logps)

    adv = lsp_advantages(rewards, torch.zeros_like(rewards))
    challenger_logps = t(float("nan"), float("nan")).requires_grad_(True)  # must not enter the loss
    out = lsp_loss(
        (token_logps * mask).sum(-1),
        adv.solver,
        challenger_logps,
        adv.challenger,
        challenger_coef=0.0,
        kl_coef=beta,
        kl_estimator="k3",
        solver_kl=kl_k3(token_logps, ref_token_logps, mask),
        challenger_kl=torch.zeros(n, dtype=F64),
    )
    lsp_grad, ch_grad = torch.autograd.grad(out.loss, (token_logps, challenger_logps), allow_unused=True)
    torch.testing.assert_close(lsp_grad, grpo_grad, rtol=0, atol=1e-14)
    assert ch_grad is None
    # Values differ only by the per-token ratio's value: GRPO's pg term is −Σ_t A = −len·A per sequence.
    offset = ((lengths.to(F64) - 1) * group_adv.reshape(-1)).sum() / (n * g)
    torch.testing.assert_close(out.loss, grpo + offset, rtol=0, atol=1e-14)
    assert grpo_grad.abs().sum() > 0
