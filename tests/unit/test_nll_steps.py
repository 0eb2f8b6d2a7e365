"""The NLL term on y (``spin.nll_coef``, ``tpaw.nll_coef``) in the SPIN and TPAW loss steps, on a bigram
table "LM" whose log-probs are exact: the token counts, the per-token NLL, the TPAW ⇒ SPIN reduction
with the term on, and bitwise identity with the term off."""

from __future__ import annotations

import pytest
import torch
from tests.unit.table_lm import TableModel

from sparring.algorithms.spin import PairBatch, spin_step
from sparring.algorithms.tpaw import TeamBatch, tpaw_step
from sparring.logprobs import collate, sequence_logps
from sparring.losses import spin_loss, tpaw_loss

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
PROMPTS = [[1, 2], [3], [2, 4, 5]]
REAL = [[3, 4, 5, 1], [2], [5, 5, 0]]  # 4, 1 and 3 tokens: ragged on purpose
GENERATED = [[1, 1], [4, 3, 2], [0]]
OPPONENT_REAL, OPPONENT_GENERATED = [-6.0, -2.5, -4.0], [-3.0, -5.5, -1.0]


def sequences():
    return collate([(p, r) for p, r in zip(PROMPTS, REAL)] + [(p, g) for p, g in zip(PROMPTS, GENERATED)], pad_id=0)


def pair_batch() -> PairBatch:
    return PairBatch(sequences(), torch.tensor(OPPONENT_REAL, dtype=F64), torch.tensor(OPPONENT_GENERATED, dtype=F64))


def team_batch(average: bool = False) -> TeamBatch:
    k = 2
    shift = torch.tensor([[0.0, 0.7], [0.0, -0.4], [0.0, 1.1]], dtype=F64)[:, :k]
    real, generated = torch.tensor(OPPONENT_REAL, dtype=F64), torch.tensor(OPPONENT_GENERATED, dtype=F64)
    if average:  # team log-probs on the per-token scale, as tpaw.logprob_reduction=mean stores them
        real, generated = real / torch.tensor([4.0, 1.0, 3.0]), generated / torch.tensor([2.0, 3.0, 1.0])
    return TeamBatch(sequences(), real[:, None] + shift, generated[:, None] - shift,
                     torch.ones(3, k, dtype=torch.bool))


def real_logps(model) -> torch.Tensor:
    """L_θ(y_i) by hand: the bigram table's log-softmax row of each previous token, summed over y_i."""
    table = torch.log_softmax(model.table, dim=-1)  # (V, V)
    return torch.stack([sum(table[a, b] for a, b in zip((p + r)[len(p) - 1 : -1], r)) for p, r in zip(PROMPTS, REAL)])


def expected_nll(model) -> torch.Tensor:
    """Σ_i −L_θ(y_i) / Σ_i |y_i| with the hand-counted lengths 4 + 1 + 3 = 8."""
    return (-real_logps(model).sum() / 8).detach()


@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_spin_step_adds_coef_times_per_token_nll_of_the_real_responses(coef):
    model = TableModel()
    on = spin_step(model, pair_batch(), scale=0.1, kind="sigmoid", nll_coef=coef)
    off = spin_step(model, pair_batch(), scale=0.1, kind="sigmoid")
    torch.testing.assert_close(on.metrics["nll/real"], expected_nll(model), **TOL)
    torch.testing.assert_close(on.loss.mean(), off.loss.mean() + coef * expected_nll(model), **TOL)
    # the term's gradient is −coef/Σ|y| · ∇Σ_i L_θ(y_i)
    (g_on,) = torch.autograd.grad(on.loss.mean(), [model.table])
    (g_off,) = torch.autograd.grad(off.loss.mean(), [model.table])
    (g_real,) = torch.autograd.grad(real_logps(model).sum(), [model.table])
    torch.testing.assert_close(g_on - g_off, -coef / 8 * g_real, **TOL)


def test_spin_step_with_coef_zero_is_bitwise_the_paper_step():
    model = TableModel()
    out = spin_step(model, pair_batch(), scale=0.1, kind="sigmoid", nll_coef=0.0)
    real, generated = sequence_logps(model, pair_batch().sequences).chunk(2)
    before = spin_loss(real, generated, pair_batch().opponent_real, pair_batch().opponent_generated, scale=0.1)
    assert torch.equal(out.loss, before.loss) and out.metrics.keys() == before.metrics.keys()
    assert "nll/real" not in out.metrics


@pytest.mark.parametrize("average", [False, True])
def test_tpaw_step_adds_the_same_per_token_nll_under_either_reduction(average):
    model = TableModel()
    kwargs = dict(scale=0.1, eta=6.0, gamma=0.5)
    on = tpaw_step(model, team_batch(average), average=average, nll_coef=1.5, **kwargs)
    off = tpaw_step(model, team_batch(average), average=average, **kwargs)
    # the NLL of y is the token mean of the summed log-probs whichever way the pair terms reduce them
    torch.testing.assert_close(on.metrics["nll/real"], expected_nll(model), **TOL)
    torch.testing.assert_close(on.loss.mean(), off.loss.mean() + 1.5 * expected_nll(model), **TOL)


def test_tpaw_step_with_coef_zero_is_bitwise_the_paper_step():
    model = TableModel()
    batch = team_batch()
    out = tpaw_step(model, batch, average=False, nll_coef=0.0, scale=0.1, eta=6.0, gamma=0.5)
    real, generated = sequence_logps(model, batch.sequences).chunk(2)
    before = tpaw_loss(real, generated, batch.team_real, batch.team_generated, team_mask=batch.team_mask,
                       scale=0.1, eta=6.0, gamma=0.5)
    assert torch.equal(out.loss, before.loss) and out.metrics.keys() == before.metrics.keys()


def test_single_player_tpaw_with_nll_term_is_spin_with_nll_term():
    model = TableModel()
    batch = pair_batch()
    team = TeamBatch(batch.sequences, batch.opponent_real[:, None], batch.opponent_generated[:, None],
                     torch.ones(3, 1, dtype=torch.bool))
    spin = spin_step(model, batch, scale=0.1, kind="sigmoid", nll_coef=0.7)
    tpaw = tpaw_step(model, team, average=False, nll_coef=0.7, scale=0.1, eta=1.0, gamma=0.5)
    torch.testing.assert_close(tpaw.loss, spin.loss, **TOL)
    torch.testing.assert_close(tpaw.metrics["nll/real"], spin.metrics["nll/real"], **TOL)
    (g_tpaw,) = torch.autograd.grad(tpaw.loss.mean(), [model.table])
    (g_spin,) = torch.autograd.grad(spin.loss.mean(), [model.table])
    torch.testing.assert_close(g_tpaw, g_spin, **TOL)
