"""SPIN loss against the worked numbers of spec/spin.md §4 (items 1–7, 9) and against TRL's DPO loss."""

from __future__ import annotations

import math
import types

import pytest
import torch
from tests.unit.trl_dpo import bare_dpo_trainer, last_metrics

from sparring.losses import pair_loss, spin_loss

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True)


def random_logps(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(-30 * torch.rand(n, generator=gen, dtype=F64) for _ in range(4))


# --- §4 item 1: policy = opponent ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [("sigmoid", math.log(2)), ("hinge", 1.0)])
def test_policy_equals_opponent_gives_log2_and_zero_rewards(kind: str, expected: float) -> None:
    real, generated = t(-10.0, -3.5, -42.0), t(-20.0, -3.5, -1.0)
    out = spin_loss(real, generated, real.clone(), generated.clone(), scale=0.1, kind=kind)
    torch.testing.assert_close(out.loss, torch.full((3,), expected, dtype=F64), **TOL)
    assert abs(math.log(2) - 0.693147) < 5e-7  # the spec's rounded value
    assert out.metrics["rewards/real"].item() == 0.0
    assert out.metrics["rewards/generated"].item() == 0.0
    assert out.metrics["rewards/margins"].item() == 0.0
    assert out.metrics["rewards/accuracies"].item() == 0.0  # strict >


# --- §4 item 2: the gradient at θ = θ_t is ∓λ/2, none reaches the opponent ---------------------


def test_gradient_at_policy_equals_opponent_is_half_scale() -> None:
    pr, pg = t(-10.0, -7.0, grad=True), t(-20.0, -9.0, grad=True)
    opr, opg = t(-10.0, -7.0, grad=True), t(-20.0, -9.0, grad=True)
    out = spin_loss(pr, pg, opr, opg, scale=0.1)
    g_pr, g_pg, g_or, g_og = grads(out.loss, pr, pg, opr, opg)
    torch.testing.assert_close(g_pr, t(-0.05, -0.05), **TOL)
    torch.testing.assert_close(g_pg, t(0.05, 0.05), **TOL)
    assert g_or is None and g_og is None  # opponent log-probs are detached inside the loss
    assert not any(m.requires_grad for m in out.metrics.values())


# --- §4 items 3 and 4: the worked example ---------------------------------------------------------


def test_worked_example_scale_0_1() -> None:
    pr, pg = t(-10.0, grad=True), t(-20.0, grad=True)
    out = spin_loss(pr, pg, t(-12.0), t(-18.0), scale=0.1)
    assert out.loss.item() == pytest.approx(0.513015, abs=5e-7)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-14)
    g_pr, g_pg = grads(out.loss, pr, pg)
    assert g_pr.item() == pytest.approx(-0.0401312, abs=5e-8)
    assert g_pg.item() == pytest.approx(0.0401312, abs=5e-8)
    assert g_pr.item() == pytest.approx(-0.1 / (1 + math.exp(0.4)), rel=1e-14)
    m = out.metrics
    assert m["rewards/real"].item() == pytest.approx(0.2, rel=1e-14)
    assert m["rewards/generated"].item() == pytest.approx(-0.2, rel=1e-14)
    assert m["rewards/margins"].item() == pytest.approx(0.4, rel=1e-14)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/real"].item() == -10.0 and m["logps/generated"].item() == -20.0


def test_worked_example_hinge() -> None:
    pr, pg = t(-10.0, grad=True), t(-20.0, grad=True)
    out = spin_loss(pr, pg, t(-12.0), t(-18.0), scale=0.1, kind="hinge")
    assert out.loss.item() == pytest.approx(0.6, rel=1e-14)
    g_pr, g_pg = grads(out.loss, pr, pg)
    assert (g_pr.item(), g_pg.item()) == pytest.approx((-0.1, 0.1), rel=1e-14)


def test_worked_example_scale_5() -> None:
    out = spin_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), scale=5.0)
    assert out.loss.item() == pytest.approx(2.06e-9, rel=1e-3)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-20.0)), rel=1e-12)


# --- §4 item 5: invariances and the swap identity -------------------------------------------------


def test_shift_invariances() -> None:
    pr, pg, opr, opg = random_logps(16, seed=0)
    base = spin_loss(pr, pg, opr, opg, scale=0.7).loss
    torch.testing.assert_close(spin_loss(pr + 3.25, pg + 3.25, opr, opg, scale=0.7).loss, base, **TOL)
    torch.testing.assert_close(spin_loss(pr, pg, opr - 11.5, opg - 11.5, scale=0.7).loss, base, **TOL)
    # a shift of one side only does change the loss (the test can fail)
    assert not torch.allclose(spin_loss(pr + 1.0, pg, opr, opg, scale=0.7).loss, base)


def test_swap_real_and_generated_negates_margin() -> None:
    pr, pg, opr, opg = random_logps(16, seed=1)
    scale = 0.3
    out = spin_loss(pr, pg, opr, opg, scale=scale)
    swapped = spin_loss(pg, pr, opg, opr, scale=scale)
    z = (pr - opr) - (pg - opg)
    torch.testing.assert_close(out.loss - swapped.loss, -scale * z, rtol=1e-10, atol=1e-10)


# --- §4 item 6: degenerate pair -------------------------------------------------------------------


def test_degenerate_pair_has_exactly_zero_gradient() -> None:
    # y′ ≡ y token for token: the policy and the opponent give both sides the same log-prob.
    shared = t(-13.0, -2.5, grad=True)
    out = spin_loss(shared, shared, t(-11.0, -4.0), t(-11.0, -4.0), scale=0.1)
    torch.testing.assert_close(out.loss, torch.full((2,), math.log(2), dtype=F64), **TOL)
    (g,) = grads(out.loss, shared)
    assert torch.equal(g, torch.zeros(2, dtype=F64))


# --- §4 item 7: hinge -----------------------------------------------------------------------------


def test_hinge_is_relu_and_flat_beyond_margin_one() -> None:
    pr, pg = t(-10.0, -10.0, -10.0, grad=True), t(-20.0, -26.0, -28.0, grad=True)
    opr, opg = t(-10.0, -10.0, -10.0), t(-20.0, -20.0, -20.0)
    out = spin_loss(pr, pg, opr, opg, scale=0.25, kind="hinge")  # λz = 0, 1.5, 2
    torch.testing.assert_close(out.loss, t(1.0, 0.0, 0.0), **TOL)
    g_pr, g_pg = grads(out.loss, pr, pg)
    torch.testing.assert_close(g_pr, t(-0.25, 0.0, 0.0), **TOL)
    torch.testing.assert_close(g_pg, t(0.25, 0.0, 0.0), **TOL)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        spin_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), scale=0.1, kind="ipo")


# --- §4 item 9: tabular Theorem 5.4 ---------------------------------------------------------------


def expected_spin_loss(logits: torch.Tensor, p_data: torch.Tensor, opponent: torch.Tensor, scale: float):
    """E_{y~p_data, y′~π_θt} of the logistic SPIN loss for a categorical policy softmax(logits)."""
    log_pi, log_opp = torch.log_softmax(logits, 0), opponent.log()
    n = len(p_data)
    y, y_gen = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")  # all (y, y′) pairs
    y, y_gen = y.flatten(), y_gen.flatten()
    out = spin_loss(log_pi[y], log_pi[y_gen], log_opp[y], log_opp[y_gen], scale=scale)
    return (p_data[y] * opponent[y_gen] * out.loss).sum()


def minimise(p_data: torch.Tensor, opponent: torch.Tensor, scale: float) -> torch.Tensor:
    logits = opponent.log().clone().requires_grad_(True)  # start at θ_t
    opt = torch.optim.LBFGS(
        [logits],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = expected_spin_loss(logits, p_data, opponent, scale)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.softmax(logits.detach(), 0)


P_DATA = (0.5, 0.3, 0.2)
OPPONENT = (0.2, 0.3, 0.5)


@pytest.mark.parametrize(
    ("scale", "expected"),
    [(0.5, (0.7669, 0.1840, 0.0491)), (1.0, P_DATA), (2.0, (0.3391, 0.3217, 0.3391))],
)
def test_tabular_minimiser_matches_theorem_5_4(scale: float, expected: tuple[float, ...]) -> None:
    p_data, opponent = t(*P_DATA), t(*OPPONENT)
    pi = minimise(p_data, opponent, scale)
    closed_form = opponent * (p_data / opponent) ** (1 / scale)
    torch.testing.assert_close(pi, closed_form / closed_form.sum(), rtol=0, atol=1e-7)
    torch.testing.assert_close(pi, t(*expected), rtol=0, atol=5e-5)


def test_tabular_opponent_equal_to_data_is_optimal_with_loss_log2() -> None:
    p_data = t(*P_DATA)
    logits = p_data.log().clone().requires_grad_(True)
    loss = expected_spin_loss(logits, p_data, p_data, scale=0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-14)
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g, torch.zeros(3, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(minimise(p_data, p_data, scale=0.5), p_data, rtol=0, atol=1e-9)


# --- parity with TRL's DPO loss -------------------------------------------------------------------


def trl_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch-mean loss and logged metrics computed by TRL's own ``DPOTrainer._compute_loss``.

    The trainer is built with ``object.__new__`` and given only the attributes its loss path reads
    (standard DPO: reverse-KL, no label smoothing, no WPO weighting, precomputed reference
    log-probs). The "model" is a stub whose per-token log-probs are one completion token per
    sequence holding the sequence log-prob, so TRL's own sum over tokens reproduces our inputs.
    """
    trainer = bare_dpo_trainer(beta=beta, loss_type=loss_type)
    n = policy_chosen.shape[0]

    def model(**_: object) -> types.SimpleNamespace:
        # (2B, 1): TRL's batch is [chosen; rejected]
        log_probs = torch.cat([policy_chosen, policy_rejected]).unsqueeze(1)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    inputs = {
        "input_ids": torch.zeros(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * n)),  # prompt token, one completion token
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, last_metrics(trainer)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_spin_loss_equals_trl_dpo_loss(loss_type: str) -> None:
    pr, pg, opr, opg = random_logps(8, seed=7)
    pr, pg = pr - 0.5 * opr, pg - 0.2 * opg  # decorrelate policy and opponent
    pr.requires_grad_(True)
    pg.requires_grad_(True)
    beta = 0.1 if loss_type == "sigmoid" else 0.05  # keeps some hinge terms inside the margin
    trl_loss, trl_metrics = trl_dpo_loss(pr, pg, opr, opg, beta=beta, loss_type=loss_type)
    ours = spin_loss(pr, pg, opr, opg, scale=beta, kind=loss_type)
    assert trl_loss.dtype == F64
    torch.testing.assert_close(ours.loss.mean(), trl_loss, **TOL)
    trl_grads = grads(trl_loss, pr, pg)
    our_grads = grads(ours.loss.mean(), pr, pg)
    assert (trl_grads[0] != 0).any()  # the comparison is not vacuous
    for theirs, mine in zip(trl_grads, our_grads, strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)
    # per-example parity: TRL only returns the batch mean, so score rows one at a time
    for i in range(len(pr)):
        row = slice(i, i + 1)
        single, _ = trl_dpo_loss(pr[row], pg[row], opr[row], opg[row], beta=beta, loss_type=loss_type)
        torch.testing.assert_close(ours.loss[i], single, **TOL)
    names = {
        "rewards/chosen": "rewards/real",
        "rewards/rejected": "rewards/generated",
        "rewards/margins": "rewards/margins",
        "rewards/accuracies": "rewards/accuracies",
        "logps/chosen": "logps/real",
        "logps/rejected": "logps/generated",
    }
    for trl_name, our_name in names.items():
        expected = pytest.approx(trl_metrics[trl_name], rel=1e-7, abs=1e-12)
        assert ours.metrics[our_name].item() == expected, our_name


# --- the NLL term on y (spin.nll_coef; RPO-style extension, not the paper's method) ----------------


def test_nll_term_worked_example() -> None:
    # Row 0 is the spec's example (λz = 0.4), |y| = 4; row 1 sits at θ = θ_t (log 2), |y| = 2. c = 0.5.
    # NLL = (10 + 6) / (4 + 2) = 8/3, a token mean over the batch (TRL's normalisation).
    pr, pg = t(-10.0, -6.0, grad=True), t(-20.0, -9.0, grad=True)
    tokens = torch.tensor([4, 2])
    out = spin_loss(pr, pg, t(-12.0, -6.0), t(-18.0, -9.0), scale=0.1, nll_coef=0.5, real_tokens=tokens)
    assert out.metrics["nll/real"].item() == pytest.approx(8 / 3, rel=1e-14)
    # mean loss = (softplus(−0.4) + log 2)/2 + 0.5 · 8/3 = 0.6030812 + 1.3333333
    assert out.loss.mean().item() == pytest.approx(1.936414549813282, rel=1e-12)
    # each row carries its share B·(−L_θ(y_i))/Σ|y|: 0.5·2·10/6 and 0.5·2·6/6
    torch.testing.assert_close(out.loss.detach(), t(0.5130152523999526 + 5 / 3, math.log(2) + 1.0), **TOL)
    g_real, g_gen = grads(out.loss.mean(), pr, pg)
    # ∂/∂pr_i = −λσ(−λz_i)/B − c/Σ|y|; the NLL term gives y′ no gradient
    torch.testing.assert_close(g_real, t(-0.10339895032771074, -0.025 - 0.5 / 6), **TOL)
    torch.testing.assert_close(g_gen, t(0.0200656169943774, 0.025), **TOL)


def test_nll_term_is_the_per_token_nll_and_adds_linearly() -> None:
    pr, pg, opr, opg = random_logps(6, seed=3)
    tokens = torch.tensor([3, 9, 1, 4, 12, 7])
    base = spin_loss(pr, pg, opr, opg, scale=0.1)
    for coef in (0.25, 1.0, 4.0):
        out = spin_loss(pr, pg, opr, opg, scale=0.1, nll_coef=coef, real_tokens=tokens)
        nll = -pr.sum() / tokens.sum()
        torch.testing.assert_close(out.metrics["nll/real"], nll, **TOL)
        torch.testing.assert_close(out.loss.mean(), base.loss.mean() + coef * nll, **TOL)
        assert {k: v for k, v in out.metrics.items() if k != "nll/real"} == base.metrics


def test_nll_coef_zero_is_bitwise_the_paper_loss() -> None:
    pr, pg, opr, opg = random_logps(8, seed=11)
    pr.requires_grad_(True)
    tokens = torch.arange(1, 9)
    for kind in ("sigmoid", "hinge"):
        plain = spin_loss(pr, pg, opr, opg, scale=0.1, kind=kind)
        off = spin_loss(pr, pg, opr, opg, scale=0.1, kind=kind, nll_coef=0.0, real_tokens=tokens)
        # the pre-switch formula, written out
        before = pair_loss(0.1 * ((pr - opr) - (pg - opg)), kind)
        assert torch.equal(off.loss, plain.loss) and torch.equal(off.loss, before)
        assert torch.equal(grads(off.loss.mean(), pr)[0], grads(before.mean(), pr)[0])
        assert off.metrics.keys() == plain.metrics.keys() and "nll/real" not in off.metrics
        assert all(torch.equal(off.metrics[k], plain.metrics[k]) for k in plain.metrics)


def test_nll_term_needs_token_counts_of_the_right_shape() -> None:
    pr, pg, opr, opg = random_logps(3, seed=5)
    with pytest.raises(ValueError, match="real_tokens"):
        spin_loss(pr, pg, opr, opg, scale=0.1, nll_coef=1.0)
    with pytest.raises(ValueError, match="shape"):
        spin_loss(pr, pg, opr, opg, scale=0.1, nll_coef=1.0, real_tokens=torch.tensor([1, 2]))


def trl_rpo_loss(
    token_chosen: torch.Tensor,  # (B, T) per-token log-probs of the chosen (real) completions
    token_rejected: torch.Tensor,  # (B, T) of the rejected (generated) ones
    mask_chosen: torch.Tensor,  # (B, T) 1 on completion tokens
    mask_rejected: torch.Tensor,  # (B, T)
    ref_chosen: torch.Tensor,  # (B,)
    ref_rejected: torch.Tensor,  # (B,)
    *,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """TRL's DPO + RPO loss from its own ``_compute_loss``: ``loss_type=["sigmoid", "sft"]``,
    ``loss_weights=[1, α]`` — TRL ≥ 1.0's form of the former ``rpo_alpha=α``. The stub model returns
    per-token log-probs, zero off the completion (as TRL's fused head does at label −100)."""
    trainer = bare_dpo_trainer(beta=beta, loss_type="sigmoid", loss_types=["sigmoid", "sft"],
                               loss_weights=[1.0, alpha])
    mask = torch.cat([mask_chosen, mask_rejected])  # (2B, T)

    def model(**_: object) -> types.SimpleNamespace:
        log_probs = torch.cat([token_chosen, token_rejected]) * mask  # (2B, T)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    n, length = mask.shape
    inputs = {
        "input_ids": torch.zeros(n, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, length + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(n, 1, dtype=mask.dtype), mask], dim=1),  # one prompt token
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trainer._compute_loss(model, inputs, return_outputs=False)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_spin_loss_with_nll_term_equals_trl_dpo_with_rpo(alpha: float) -> None:
    gen = torch.Generator().manual_seed(17)
    batch, length = 6, 9
    lengths_c, lengths_r = torch.tensor([1, 9, 4, 6, 2, 7]), torch.tensor([5, 3, 9, 1, 8, 4])  # ragged
    positions = torch.arange(length)
    mask_c = (positions < lengths_c[:, None]).to(F64)
    mask_r = (positions < lengths_r[:, None]).to(F64)
    token_c = (-3 * torch.rand(batch, length, generator=gen, dtype=F64)).requires_grad_(True)
    token_r = (-3 * torch.rand(batch, length, generator=gen, dtype=F64)).requires_grad_(True)
    ref_c, ref_r = -12 * torch.rand(batch, generator=gen, dtype=F64), -12 * torch.rand(batch, generator=gen, dtype=F64)

    theirs = trl_rpo_loss(token_c, token_r, mask_c, mask_r, ref_c, ref_r, beta=0.1, alpha=alpha)
    pr, pg = (token_c * mask_c).sum(-1), (token_r * mask_r).sum(-1)
    ours = spin_loss(pr, pg, ref_c, ref_r, scale=0.1, nll_coef=alpha, real_tokens=lengths_c).loss.mean()
    plain = spin_loss(pr, pg, ref_c, ref_r, scale=0.1).loss.mean()
    assert abs(theirs.item() - plain.item()) > 0.5  # the NLL term is really in TRL's loss
    # TRL's normalisation is a token mean over the batch, not a mean of per-row means (they differ here)
    row_means = plain + alpha * (-pr / lengths_c).mean()
    assert abs(row_means.item() - theirs.item()) > 1e-3
    torch.testing.assert_close(ours, theirs, **TOL)
    for mine, trl in zip(grads(ours, token_c, token_r), grads(theirs, token_c, token_r), strict=True):
        torch.testing.assert_close(mine, trl, **TOL)
