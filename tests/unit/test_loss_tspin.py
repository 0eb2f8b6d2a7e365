"""T-SPIN loss against the worked numbers of spec/tspin.md §4 (items 11–17)."""

from __future__ import annotations

import math

import pytest
import torch

from sparring.losses import spin_loss, tspin_loss

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def triplet(*abc: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t(v, grad=True) for v in abc)  # type: ignore[return-value]


def sigma(u: float) -> float:
    return 1 / (1 + math.exp(-u))


def sp(u: float) -> float:  # softplus
    return math.log1p(math.exp(u))


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss.sum(), inputs)


def random_triplets(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(  # type: ignore[return-value]
        (-40 * torch.rand(n, generator=gen, dtype=F64)).requires_grad_(True) for _ in range(3)
    )


# --- item 11: a = b = c ---------------------------------------------------------------------------


def test_equal_logps_give_one_plus_beta_log2_and_known_gradients() -> None:
    a, b, c = triplet(-12.0, -12.0, -12.0)
    out = tspin_loss(a, b, c, scale=1.0, history_weight=0.1)
    assert out.loss.item() == pytest.approx(0.762462, abs=5e-7)
    assert out.loss.item() == pytest.approx(1.1 * math.log(2), rel=1e-14)
    g = [x.item() for x in grads(out.loss, a, b, c)]
    assert g == pytest.approx([-0.5, 0.45, 0.05], rel=1e-14)
    assert out.metrics["rewards/accuracies"].item() == 0.0  # strict >: ties do not count
    assert out.metrics["tspin/history_accuracy"].item() == 0.0


def test_equal_logps_gradients_scale_with_alpha() -> None:
    a, b, c = triplet(-3.0, -3.0, -3.0)
    out = tspin_loss(a, b, c, scale=0.3, history_weight=0.25)
    g = [x.item() for x in grads(out.loss, a, b, c)]
    assert g == pytest.approx([-0.15, 0.3 * 0.75 / 2, 0.3 * 0.25 / 2], rel=1e-14)


# --- item 12: worked examples ---------------------------------------------------------------------


def test_example_well_ordered_triplet() -> None:
    out = tspin_loss(t(-10.0), t(-20.0), t(-30.0), scale=1.0, history_weight=0.1)
    assert out.loss.item() == pytest.approx(4.99388e-5, rel=1e-5)
    assert out.loss.item() == pytest.approx(1.1 * math.log1p(math.exp(-10.0)), rel=1e-14)


def test_example_synthetic_beats_real() -> None:
    a, b, c = triplet(-15.0, -14.0, -20.0)
    out = tspin_loss(a, b, c, scale=1.0, history_weight=0.1)
    assert out.loss.item() == pytest.approx(1.313509, abs=5e-7)
    g_a, g_b, g_c = (x.item() for x in grads(out.loss, a, b, c))
    assert g_a == pytest.approx(-0.731059, abs=5e-7)
    assert g_b == pytest.approx(0.730811, abs=5e-7)
    assert g_c == pytest.approx(0.000247, abs=5e-7)
    expected = (-sigma(1), sigma(1) - 0.1 * sigma(-6), 0.1 * sigma(-6))
    assert (g_a, g_b, g_c) == pytest.approx(expected, rel=1e-13)


def test_metrics_of_worked_example() -> None:
    a, b, c = t(-15.0, -10.0), t(-14.0, -20.0), t(-20.0, -18.0)
    m = tspin_loss(a, b, c, scale=2.0, history_weight=0.1).metrics
    assert m["logps/real"].item() == -12.5
    assert m["logps/generated"].item() == -17.0
    assert m["tspin/logps_proto"].item() == -19.0
    assert m["tspin/current_margin"].item() == pytest.approx((2 * -1 + 2 * 10) / 2, rel=1e-14)
    assert m["tspin/history_margin"].item() == pytest.approx((2 * 6 + 2 * -2) / 2, rel=1e-14)
    assert m["tspin/current_loss"].item() == pytest.approx((sp(2) + sp(-20)) / 2, rel=1e-14)
    assert m["tspin/history_loss"].item() == pytest.approx((sp(-12) + sp(4)) / 2, rel=1e-14)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["tspin/history_accuracy"].item() == 0.5
    assert not any(v.requires_grad for v in m.values())
    assert all(v.dim() == 0 for v in m.values())


# --- item 13: gradient signs ----------------------------------------------------------------------


def test_gradient_signs_on_random_triplets() -> None:
    a, b, c = random_triplets(512, seed=0)
    out = tspin_loss(a, b, c, scale=0.7, history_weight=0.4)
    g_a, g_b, g_c = grads(out.loss, a, b, c)
    assert (g_a <= 0).all() and (g_a < 0).any()
    assert (g_c >= 0).all() and (g_c > 0).any()
    assert (g_b > 0).any() and (g_b < 0).any()  # either sign occurs
    # per example the three partials sum to zero (shift invariance, item 17)
    torch.testing.assert_close(g_a + g_b + g_c, torch.zeros(512, dtype=F64), rtol=0, atol=1e-15)


# --- item 14: vanishing current advantage ---------------------------------------------------------


def test_identical_real_and_synthetic_still_get_history_gradient() -> None:
    shared, c = t(-15.0, grad=True), t(-20.0, grad=True)
    out = tspin_loss(shared, shared, c, scale=1.0, history_weight=0.1)
    assert out.loss.item() == pytest.approx(0.693819, abs=5e-7)
    assert out.loss.item() == pytest.approx(math.log(2) + 0.1 * math.log1p(math.exp(-5.0)), rel=1e-14)
    g_shared, g_c = grads(out.loss, shared, c)  # g_shared = ∂/∂a + ∂/∂b
    assert g_shared.item() == pytest.approx(-0.000669, abs=5e-7)
    assert g_c.item() == pytest.approx(0.000669, abs=5e-7)
    assert g_c.item() == pytest.approx(0.1 / (1 + math.exp(5.0)), rel=1e-13)


def test_all_three_identical_have_zero_gradient() -> None:
    shared = t(-15.0, grad=True)
    out = tspin_loss(shared, shared, shared, scale=1.0, history_weight=0.1)
    (g,) = grads(out.loss, shared)
    assert g.item() == 0.0


# --- item 15: β = 0 is reference-free SPIN with scale α -------------------------------------------


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_zero_history_weight_is_reference_free_spin(kind: str) -> None:
    a, b, c = random_triplets(64, seed=1)
    zeros = torch.zeros(64, dtype=F64)
    ours = tspin_loss(a, b, c, scale=0.05, history_weight=0.0, kind=kind)
    spin = spin_loss(a, b, zeros, zeros, scale=0.05, kind=kind)
    torch.testing.assert_close(ours.loss, spin.loss, **TOL)
    ours_grads = grads(ours.loss, a, b, c)
    spin_grads = torch.autograd.grad(spin.loss.sum(), (a, b))
    torch.testing.assert_close(ours_grads[0], spin_grads[0], **TOL)
    torch.testing.assert_close(ours_grads[1], spin_grads[1], **TOL)
    assert torch.equal(ours_grads[2], torch.zeros(64, dtype=F64))
    assert ours.metrics["rewards/accuracies"].item() == spin.metrics["rewards/accuracies"].item()


# --- item 16/17: only the three policy log-probs matter; shift invariance -------------------------


def test_shift_invariance() -> None:
    a, b, c = random_triplets(32, seed=2)
    base = tspin_loss(a, b, c, scale=1.0, history_weight=0.1).loss
    shifted = tspin_loss(a - 7.25, b - 7.25, c - 7.25, scale=1.0, history_weight=0.1).loss
    torch.testing.assert_close(shifted, base, **TOL)
    assert not torch.allclose(tspin_loss(a - 1.0, b, c, scale=1.0, history_weight=0.1).loss, base)


def test_hinge_variant_values() -> None:
    a, b, c = t(-10.0, -10.0), t(-10.5, -12.0), t(-10.0, -20.0)
    out = tspin_loss(a, b, c, scale=1.0, history_weight=0.5, kind="hinge")
    # row 0: relu(1 - 0.5) + 0.5 relu(1 + 0.5); row 1: relu(1 - 2) + 0.5 relu(1 - 8)
    torch.testing.assert_close(out.loss, t(0.5 + 0.75, 0.0), **TOL)


def test_gradcheck() -> None:
    a, b, c = (x.detach().div(10).requires_grad_(True) for x in random_triplets(6, seed=3))
    assert torch.autograd.gradcheck(
        lambda x, y, z: tspin_loss(x, y, z, scale=0.3, history_weight=0.1).loss,
        (a, b, c),
        eps=1e-6,
        atol=1e-9,
    )


def test_gradcheck_hinge_away_from_kinks() -> None:
    a, b, c = t(-1.0, -2.0, grad=True), t(-1.5, -1.0, grad=True), t(-3.0, -1.2, grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, z: tspin_loss(x, y, z, scale=1.0, history_weight=0.3, kind="hinge").loss,
        (a, b, c),
        eps=1e-6,
        atol=1e-9,
    )


# --- validation -----------------------------------------------------------------------------------


def test_rejects_mismatched_shapes_negative_weight_and_unknown_kind() -> None:
    with pytest.raises(ValueError, match="shape"):
        tspin_loss(t(-1.0, -2.0), t(-1.0), t(-1.0), scale=1.0, history_weight=0.1)
    with pytest.raises(ValueError, match="history_weight"):
        tspin_loss(t(-1.0), t(-1.0), t(-1.0), scale=1.0, history_weight=-0.1)
    with pytest.raises(ValueError, match="kind"):
        tspin_loss(t(-1.0), t(-1.0), t(-1.0), scale=1.0, history_weight=0.1, kind="exponential")
