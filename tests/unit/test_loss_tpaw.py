"""TPAW loss against spec/tpaw.md §A.10 and §A.14 (items 1–5, 7, 8, 10) and the team_mask switch."""

from __future__ import annotations

import math

import pytest
import torch

from sparring.losses import spin_loss, tpaw_loss

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def rows(*values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True)


def random_batch(n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Policy log-probs (B,) and team log-probs (B, K) near them, so both α branches occur."""
    gen = torch.Generator().manual_seed(seed)
    policy_real = -30 * torch.rand(n, generator=gen, dtype=F64)
    policy_generated = -30 * torch.rand(n, generator=gen, dtype=F64)
    team_real = policy_real.unsqueeze(1) + 4 * torch.randn(n, k, generator=gen, dtype=F64)
    team_generated = policy_generated.unsqueeze(1) + 4 * torch.randn(n, k, generator=gen, dtype=F64)
    return policy_real.requires_grad_(True), policy_generated.requires_grad_(True), team_real, team_generated


def weights(out_metrics: dict[str, torch.Tensor], k: int) -> list[float]:
    """β of a one-row batch, read from the per-player weight metrics."""
    return [out_metrics[f"tpaw/player{j}/weight"].item() for j in range(k)]


def reference(a: float, b: float, team_a: list, team_b: list, lam: float, eta: float, gamma: float):
    """Plain-float TPAW for one row: loss and (∂/∂a, ∂/∂b) with β and α held constant."""
    p_real = [lam * (a - r) for r in team_a]
    p_gen = [lam * (b - g) for g in team_b]
    margin = [pr - pg for pr, pg in zip(p_real, p_gen, strict=True)]
    alpha = [eta if pr <= 0 else 1.0 for pr in p_real]
    expo = [math.exp(-gamma * m) for m in margin]
    beta = [e / sum(expo) for e in expo]
    z = [al * pr - pg for al, pr, pg in zip(alpha, p_real, p_gen, strict=True)]
    loss = sum(bj * math.log1p(math.exp(-zj)) for bj, zj in zip(beta, z, strict=True))
    sig = [1 / (1 + math.exp(zj)) for zj in z]  # σ(−z)
    d_a = sum(-bj * sj * lam * al for bj, sj, al in zip(beta, sig, alpha, strict=True))
    d_b = sum(bj * sj * lam for bj, sj in zip(beta, sig, strict=True))
    return loss, d_a, d_b


# --- a hand-computed two-player example -----------------------------------------------------------


def test_two_player_worked_example() -> None:
    # λ = 0.1: P_0 = (0.2, −0.2), m_0 = 0.4, α_0 = 1; P_1 = (−0.1, 0.1), m_1 = −0.2, α_1 = η = 6.
    # β = softmax(−0.5·(0.4, −0.2)) = (0.425557, 0.574443); z = (0.4, −0.7).
    a, b = t(-10.0, grad=True), t(-20.0, grad=True)
    out = tpaw_loss(a, b, rows((-12.0, -9.0)), rows((-18.0, -21.0)), scale=0.1, eta=6.0, gamma=0.5)
    assert out.loss.item() == pytest.approx(0.8520344500818275, rel=1e-13)
    g_a, g_b = grads(out.loss, a, b)
    assert g_a.item() == pytest.approx(-0.24737942626173096, rel=1e-13)
    assert g_b.item() == pytest.approx(0.05546169348820258, rel=1e-13)
    m = out.metrics
    assert weights(m, 2) == pytest.approx([0.425557483188341, 0.5744425168116589], rel=1e-13)
    entropy = -sum(w * math.log(w) for w in (0.425557483188341, 0.5744425168116589))
    assert m["tpaw/weight_entropy"].item() == pytest.approx(entropy, rel=1e-13)
    expected = {
        "rewards/real": 0.2,
        "rewards/generated": -0.2,
        "rewards/margins": 0.4,
        "rewards/accuracies": 1.0,
        "logps/real": -10.0,
        "logps/generated": -20.0,
        "tpaw/player0/reward_real": 0.2,
        "tpaw/player0/margin": 0.4,
        "tpaw/player0/target_weighted_frac": 0.0,
        "tpaw/player1/reward_real": -0.1,
        "tpaw/player1/margin": -0.2,
        "tpaw/player1/target_weighted_frac": 1.0,
    }
    for name, value in expected.items():
        assert m[name].item() == pytest.approx(value, rel=1e-13), name
    assert not any(v.requires_grad for v in m.values())


def test_matches_plain_float_reference_on_random_rows() -> None:
    a, b, team_a, team_b = random_batch(40, 3, seed=0)
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    g_a, g_b = grads(out.loss, a, b)
    targeted = 0
    for i in range(40):
        loss, d_a, d_b = reference(
            a[i].item(), b[i].item(), team_a[i].tolist(), team_b[i].tolist(), lam=0.1, eta=6.0, gamma=0.5
        )
        assert out.loss[i].item() == pytest.approx(loss, rel=1e-12)
        assert g_a[i].item() == pytest.approx(d_a, rel=1e-12)
        assert g_b[i].item() == pytest.approx(d_b, rel=1e-12)
        targeted += sum(a[i].item() <= r for r in team_a[i].tolist())
    assert 0 < targeted < 120  # both α branches were exercised


# --- §A.14 items 1–2, §A.10: β properties ---------------------------------------------------------


def margins_batch(margins: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """One row with λ = 1 whose player margins are exactly ``margins``: m_j = g_j − r_j."""
    k = len(margins)
    return t(0.0), t(0.0), torch.zeros(1, k, dtype=F64), rows(margins)


def test_example_margins_give_spec_weights() -> None:
    out = tpaw_loss(*margins_batch((0.0, 0.3, 0.8)), scale=1.0, eta=6.0, gamma=0.5)
    beta = weights(out.metrics, 3)
    assert beta == pytest.approx([0.395, 0.340, 0.265], abs=5e-4)
    assert beta == pytest.approx([0.3950963763047504, 0.3400626025421349, 0.2648410211531146], rel=1e-13)
    assert out.metrics["tpaw/player2/margin"].item() == pytest.approx(0.8, rel=1e-14)


def test_weights_are_a_distribution_decreasing_in_margin() -> None:
    a, b, team_a, team_b = random_batch(20, 3, seed=1)
    for i in range(20):
        row = slice(i, i + 1)
        out = tpaw_loss(a[row], b[row], team_a[row], team_b[row], scale=0.1, eta=6.0, gamma=0.5)
        beta = weights(out.metrics, 3)
        margin = [out.metrics[f"tpaw/player{j}/margin"].item() for j in range(3)]
        assert all(w > 0 for w in beta)
        assert sum(beta) == pytest.approx(1.0, abs=1e-12)
        order_by_margin = sorted(range(3), key=lambda j: margin[j])
        assert [beta[j] for j in order_by_margin] == sorted(beta, reverse=True)  # strictly decreasing in m_j


def test_weights_invariant_to_common_margin_shift() -> None:
    base = tpaw_loss(*margins_batch((0.0, 0.3, 0.8)), scale=1.0, eta=6.0, gamma=0.5)
    shifted = tpaw_loss(*margins_batch((2.5, 2.8, 3.3)), scale=1.0, eta=6.0, gamma=0.5)
    assert weights(shifted.metrics, 3) == pytest.approx(weights(base.metrics, 3), rel=1e-12)
    assert shifted.loss.item() != pytest.approx(base.loss.item())  # the loss itself does move


def test_gamma_zero_gives_uniform_weights() -> None:
    out = tpaw_loss(*margins_batch((0.0, 0.3, 0.8)), scale=1.0, eta=6.0, gamma=0.0)
    assert weights(out.metrics, 3) == pytest.approx([1 / 3] * 3, rel=1e-14)
    assert out.metrics["tpaw/weight_entropy"].item() == pytest.approx(math.log(3), rel=1e-14)


# --- §A.14 item 3: α ∈ {1, η}, η exactly when P_j(y) ≤ 0 -------------------------------------------


@pytest.mark.parametrize(
    ("offset", "alpha"), [(0.0, 6.0), (-1e-9, 6.0), (1e-9, 1.0), (2.0, 1.0), (-2.0, 6.0)]
)
def test_target_weight_rule(offset: float, alpha: float) -> None:
    # one player, λ = 0.5, L_θ(y) − L_θ0(y) = offset, so P_0(y) = 0.5·offset (exactly 0 for offset 0)
    a, b = t(-10.0 + offset, grad=True), t(-20.0, grad=True)
    out = tpaw_loss(a, b, rows((-10.0,)), rows((-19.0,)), scale=0.5, eta=6.0, gamma=0.5)
    z = alpha * 0.5 * ((-10.0 + offset) - (-10.0)) - 0.5 * (-1.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-13)
    g_a, g_b = grads(out.loss, a, b)
    sigma = 1 / (1 + math.exp(z))  # σ(−z)
    assert g_a.item() == pytest.approx(-sigma * 0.5 * alpha, rel=1e-13)
    assert g_b.item() == pytest.approx(sigma * 0.5, rel=1e-13)
    assert out.metrics["tpaw/player0/target_weighted_frac"].item() == (1.0 if alpha == 6.0 else 0.0)


def test_eta_one_disables_target_weighting() -> None:
    a, b, team_a, team_b = random_batch(16, 3, seed=2)
    eta_one = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=1.0, gamma=0.5).loss
    margins = 0.1 * ((a - b).unsqueeze(1) - (team_a - team_b))  # (B, K) m_j
    beta = torch.softmax(-0.5 * margins, dim=1).detach()
    # with α ≡ 1 the loss is the β-weighted SPIN loss of every player
    no_trw = sum(beta[:, j] * spin_loss(a, b, team_a[:, j], team_b[:, j], scale=0.1).loss for j in range(3))
    torch.testing.assert_close(eta_one, no_trw, **TOL)


# --- §A.14 item 4, §A.10: reduction to SPIN -------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_single_player_without_target_weighting_is_spin(gamma: float) -> None:
    a, b, team_a, team_b = random_batch(32, 1, seed=3)
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=1.0, gamma=gamma)
    spin = spin_loss(a, b, team_a[:, 0], team_b[:, 0], scale=0.1)
    torch.testing.assert_close(out.loss, spin.loss, **TOL)
    for ours, theirs in zip(grads(out.loss, a, b), grads(spin.loss, a, b), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    for name in ("rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies"):
        expected = pytest.approx(spin.metrics[name].item(), rel=1e-12, abs=1e-15)
        assert out.metrics[name].item() == expected, name
    assert out.metrics["tpaw/player0/weight"].item() == 1.0
    assert out.metrics["tpaw/weight_entropy"].item() == 0.0


def test_single_player_with_target_weighting_is_not_spin() -> None:
    a, b, team_a, team_b = random_batch(32, 1, seed=3)
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    spin = spin_loss(a, b, team_a[:, 0], team_b[:, 0], scale=0.1)
    targeted = (a <= team_a[:, 0]).detach()
    assert targeted.any() and (~targeted).any()
    torch.testing.assert_close(out.loss[~targeted], spin.loss[~targeted], **TOL)
    assert (out.loss[targeted] != spin.loss[targeted]).all()


# --- §A.14 item 5, §A.10: fresh round -------------------------------------------------------------


def test_fresh_round_single_player_is_log2_with_amplified_target_gradient() -> None:
    a, b = t(-10.0, -33.0, grad=True), t(-20.0, -4.0, grad=True)
    team_a, team_b = a.detach().clone().unsqueeze(1), b.detach().clone().unsqueeze(1)  # θ = θ_t
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    torch.testing.assert_close(out.loss, torch.full((2,), math.log(2), dtype=F64), **TOL)
    g_a, g_b = grads(out.loss, a, b)  # −½λ(η∇a − ∇b)
    torch.testing.assert_close(g_a, t(-0.5 * 0.1 * 6.0, -0.5 * 0.1 * 6.0), **TOL)
    torch.testing.assert_close(g_b, t(0.05, 0.05), **TOL)
    assert out.metrics["tpaw/player0/target_weighted_frac"].item() == 1.0
    assert out.metrics["rewards/real"].item() == 0.0 and out.metrics["rewards/accuracies"].item() == 0.0


def test_fresh_round_three_players_player0_term_is_log2() -> None:
    a, b, team_a, team_b = random_batch(8, 3, seed=4)
    team_a[:, 0], team_b[:, 0] = a.detach(), b.detach()
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    assert out.metrics["tpaw/player0/target_weighted_frac"].item() == 1.0
    assert out.metrics["tpaw/player0/margin"].item() == 0.0
    for i in range(8):
        margins = [0.0] + [0.1 * ((a[i] - b[i]) - (team_a[i, j] - team_b[i, j])).item() for j in (1, 2)]
        expo = [math.exp(-0.5 * m) for m in margins]
        beta = [e / sum(expo) for e in expo]
        p_real = [0.1 * (a[i] - team_a[i, j]).item() for j in (1, 2)]
        p_gen = [0.1 * (b[i] - team_b[i, j]).item() for j in (1, 2)]
        rest = sum(
            beta[j + 1] * math.log1p(math.exp(-((6.0 if p_real[j] <= 0 else 1.0) * p_real[j] - p_gen[j])))
            for j in (0, 1)
        )
        assert out.loss[i].item() == pytest.approx(beta[0] * math.log(2) + rest, rel=1e-12)


# --- §A.14 item 7: what carries gradient ----------------------------------------------------------


def autograd_ops(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_team_log_probs_get_no_gradient() -> None:
    a, b, team_a, team_b = random_batch(8, 3, seed=5)
    team_a.requires_grad_(True)
    team_b.requires_grad_(True)
    for detach in (True, False):
        out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, detach_player_weights=detach)
        g_a, g_b, g_ta, g_tb = grads(out.loss, a, b, team_a, team_b)
        assert g_ta is None and g_tb is None
        assert g_a is not None and g_b is not None


def test_player_weights_enter_the_graph_only_when_not_detached() -> None:
    a, b, team_a, team_b = random_batch(8, 3, seed=6)
    detached = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    live = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, detach_player_weights=False)
    assert "SoftmaxBackward0" not in autograd_ops(detached.loss)
    assert "SoftmaxBackward0" in autograd_ops(live.loss)
    # Every m_j moves by the same λ·Δ(L_θ(y) − L_θ(y′)) and the softmax ignores a common shift, so
    # ∂β/∂θ = 0: the live weights change neither the loss nor its gradient (spec §A.6 expects a
    # "pushes the margins together" term; under these formulas it is identically zero).
    torch.testing.assert_close(live.loss, detached.loss, **TOL)
    for g_live, g_detached in zip(grads(live.loss, a, b), grads(detached.loss, a, b), strict=True):
        torch.testing.assert_close(g_live, g_detached, rtol=1e-12, atol=1e-15)


# --- §A.14 item 8: continuity at P_j(y) = 0 -------------------------------------------------------


def test_loss_continuous_and_finite_across_zero_target_reward() -> None:
    team_a, team_b = rows((-10.0, -12.0, -8.0)), rows((-19.0, -22.0, -18.0))
    losses, fracs = [], []
    for eps in (-1e-9, 1e-9):
        a = t(-10.0 + eps / 0.1, grad=True)  # P_0(y) = eps
        b = t(-20.0, grad=True)
        out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
        g_a, g_b = grads(out.loss, a, b)
        assert torch.isfinite(out.loss).all() and torch.isfinite(g_a).all() and torch.isfinite(g_b).all()
        losses.append(out.loss.item())
        fracs.append(out.metrics["tpaw/player0/target_weighted_frac"].item())
    assert fracs == [1.0, 0.0]  # the two points sit on the two sides of the α switch
    assert abs(losses[0] - losses[1]) < 1e-8  # α·P_0(y) is ±O(η·1e-9) on both sides: a kink, not a jump
    at_zero = tpaw_loss(t(-10.0), t(-20.0), team_a, team_b, scale=0.1, eta=6.0, gamma=0.5).loss.item()
    assert losses[0] == pytest.approx(at_zero, abs=1e-8) and losses[1] == pytest.approx(at_zero, abs=1e-8)


# --- §A.14 item 10: permutation invariance --------------------------------------------------------


def test_permuting_team_members_leaves_loss_unchanged() -> None:
    a, b, team_a, team_b = random_batch(16, 3, seed=7)
    perm = [2, 0, 1]
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    permuted = tpaw_loss(a, b, team_a[:, perm], team_b[:, perm], scale=0.1, eta=6.0, gamma=0.5)
    torch.testing.assert_close(permuted.loss, out.loss, **TOL)
    for g_perm, g in zip(grads(permuted.loss, a, b), grads(out.loss, a, b), strict=True):
        torch.testing.assert_close(g_perm, g, **TOL)
    for new_j, old_j in enumerate(perm):
        for stat in ("reward_real", "margin", "target_weighted_frac", "weight"):
            new = permuted.metrics[f"tpaw/player{new_j}/{stat}"].item()
            assert new == pytest.approx(
                out.metrics[f"tpaw/player{old_j}/{stat}"].item(), rel=1e-12, abs=1e-15
            )
    entropy = out.metrics["tpaw/weight_entropy"].item()
    assert permuted.metrics["tpaw/weight_entropy"].item() == pytest.approx(entropy, rel=1e-12)


# --- team_mask ------------------------------------------------------------------------------------


def test_all_true_mask_equals_no_mask() -> None:
    a, b, team_a, team_b = random_batch(8, 3, seed=8)
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5)
    mask = torch.ones(8, 3, dtype=torch.bool)
    masked = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, team_mask=mask)
    torch.testing.assert_close(masked.loss, out.loss, **TOL)
    assert masked.metrics.keys() == out.metrics.keys()
    for name, value in out.metrics.items():
        torch.testing.assert_close(masked.metrics[name], value, **TOL)


def test_mask_restricts_each_row_to_its_present_players() -> None:
    a, b, team_a, team_b = random_batch(3, 3, seed=9)
    mask = torch.tensor([[True, False, False], [False, True, True], [True, False, True]])
    padded_a, padded_b = team_a.masked_fill(~mask, float("nan")), team_b.masked_fill(~mask, float("inf"))
    out = tpaw_loss(a, b, padded_a, padded_b, scale=0.1, eta=6.0, gamma=0.5, team_mask=mask)
    g_a, g_b = grads(out.loss, a, b)
    assert torch.isfinite(out.loss).all() and torch.isfinite(g_a).all() and torch.isfinite(g_b).all()
    for i in range(3):
        cols = mask[i].nonzero().flatten()
        row_a, row_b = team_a[i : i + 1, cols], team_b[i : i + 1, cols]
        row = tpaw_loss(a[i : i + 1], b[i : i + 1], row_a, row_b, scale=0.1, eta=6.0, gamma=0.5)
        torch.testing.assert_close(out.loss[i : i + 1], row.loss, **TOL)
        row_g_a, row_g_b = grads(row.loss, a, b)
        torch.testing.assert_close(g_a[i], row_g_a[i], **TOL)
        torch.testing.assert_close(g_b[i], row_g_b[i], **TOL)
    # player metrics average over the rows each player scores: player 0 scores rows 0 and 2
    p0 = 0.1 * (a[[0, 2]] - team_a[[0, 2], 0]).detach()
    assert out.metrics["tpaw/player0/reward_real"].item() == pytest.approx(p0.mean().item(), rel=1e-12)
    assert out.metrics["rewards/real"].item() == pytest.approx(p0.mean().item(), rel=1e-12)
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_player_scoring_no_row_reports_nan() -> None:
    a, b, team_a, team_b = random_batch(2, 2, seed=10)
    mask = torch.tensor([[False, True], [False, True]])
    out = tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, team_mask=mask)
    assert torch.isnan(out.metrics["tpaw/player0/weight"]) and torch.isnan(out.metrics["rewards/real"])
    assert out.metrics["tpaw/player1/weight"].item() == 1.0
    only_player1 = tpaw_loss(a, b, team_a[:, 1:], team_b[:, 1:], scale=0.1, eta=6.0, gamma=0.5)
    torch.testing.assert_close(out.loss, only_player1.loss, **TOL)


def test_row_without_players_is_rejected() -> None:
    a, b, team_a, team_b = random_batch(2, 2, seed=11)
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        tpaw_loss(a, b, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, team_mask=mask)


# --- shape validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy_shape", "team_shapes", "mask", "match"),
    [
        ((2, 1), ((2, 3), (2, 3)), None, "policy_real"),
        ((2,), ((2, 3), (2, 2)), None, "team_real"),
        ((2,), ((3, 3), (3, 3)), None, "B = 2"),
        ((2,), ((2,), (2,)), None, "team_real"),
        ((2,), ((2, 0), (2, 0)), None, "empty"),
        ((2,), ((2, 3), (2, 3)), torch.ones(2, 3), "bool"),
        ((2,), ((2, 3), (2, 3)), torch.ones(2, 2, dtype=torch.bool), "team_mask"),
    ],
)
def test_shape_errors(policy_shape, team_shapes, mask, match) -> None:
    policy = torch.zeros(policy_shape, dtype=F64)
    team_a, team_b = (torch.zeros(s, dtype=F64) for s in team_shapes)
    with pytest.raises(ValueError, match=match):
        tpaw_loss(policy, policy, team_a, team_b, scale=0.1, eta=6.0, gamma=0.5, team_mask=mask)


def test_policy_shape_mismatch_is_rejected() -> None:
    team = rows((0.0,), (0.0,))
    with pytest.raises(ValueError, match="policy_generated"):
        tpaw_loss(t(-1.0, -2.0), t(-1.0), team, team, scale=0.1, eta=6.0, gamma=0.5)
