"""SPIN = DPO with real = chosen: TRL's DPOTrainer computes loss, log-probs and gradients on the same
tiny Llama and batch as sparring's log-prob function + ``spin_loss`` (TRL's own fused LM head)."""

from __future__ import annotations

import types

import pytest
import torch
from tests.unit.trl_dpo import bare_dpo_trainer, last_metrics

from sparring.algorithms.spin import PairBatch, spin_step
from sparring.logprobs import collate, scored_positions, sequence_logps
from sparring.losses import spin_loss
from sparring.tasks import build_tiny_model, build_tokenizer

BETA = 0.1


def trl_loss(policy, reference, batch, **fields):
    utils = pytest.importorskip("trl.trainer.utils")
    # As DPOTrainer.__init__ does: the policy's head also returns the fields its metrics read.
    utils.add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    utils.add_fused_lm_head(reference)
    trainer = bare_dpo_trainer(
        beta=BETA, loss_type="sigmoid", model=policy, ref_model=reference, precompute_ref_logps=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), **fields,
    )
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": batch.response_mask}
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    return loss, last_metrics(trainer)


def tiny_models_and_batch():
    """(policy, reference, batch): two tiny Llamas and a [real; generated] batch in TRL's layout."""
    tok = build_tokenizer()
    policy = build_tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=1)
    reference = build_tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=2)
    reference.requires_grad_(False)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("<|user|>What is 1 + 2?<|end|><|assistant|>"), enc("<|user|>Sort the digits 3 1.<|end|><|assistant|>")]
    real = [enc("3<|end|>"), enc("1 3<|end|>")]
    generated = [enc("12<|end|>"), enc("3 1 1<|end|>")]
    # TRL's layout: [chosen; rejected], completion tokens marked (prompt-aligned here; RoPE is relative).
    batch = collate([(p, r) for p, r in zip(prompts, real)] + [(p, g) for p, g in zip(prompts, generated)],
                    tok.pad_token_id)
    return policy, reference, batch


def test_spin_loss_on_a_tiny_model_matches_trl_dpo():
    policy, reference, batch = tiny_models_and_batch()
    logps = sequence_logps(policy, batch)
    with torch.no_grad():
        ref = sequence_logps(reference, batch)
    ours = spin_loss(logps[:2], logps[2:], ref[:2], ref[2:], scale=BETA, kind="sigmoid")
    our_loss = ours.loss.mean()
    our_grads = torch.autograd.grad(our_loss, list(policy.parameters()))

    theirs, metrics = trl_loss(policy, reference, batch)
    their_grads = torch.autograd.grad(theirs, list(policy.parameters()))

    assert abs(our_loss.item() - 0.693147) > 1e-3  # policy ≠ reference: not the trivial log 2 point
    torch.testing.assert_close(our_loss, theirs, rtol=1e-5, atol=1e-6)
    for mine, trl in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, trl, rtol=1e-4, atol=1e-6)
    assert ours.metrics["rewards/real"].item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert ours.metrics["rewards/generated"].item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert ours.metrics["logps/real"].item() == pytest.approx(metrics["logps/chosen"], abs=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_spin_step_with_nll_term_on_a_tiny_model_matches_trl_dpo_with_rpo(alpha):
    """spin.nll_coef = α against TRL's RPO: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``
    (TRL ≥ 1.0's form of ``rpo_alpha=α``) on real responses of different lengths."""
    policy, reference, batch = tiny_models_and_batch()
    real_tokens = scored_positions(batch).sum(-1)[:2]
    assert real_tokens[0] != real_tokens[1]  # per-token normalisation is not a per-row one in disguise
    with torch.no_grad():
        ref = sequence_logps(reference, batch)
    pairs = PairBatch(batch, ref[:2], ref[2:])
    ours = spin_step(policy, pairs, scale=BETA, kind="sigmoid", nll_coef=alpha)
    our_loss = ours.loss.mean()
    our_grads = torch.autograd.grad(our_loss, list(policy.parameters()))

    theirs, _ = trl_loss(policy, reference, batch, loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha])
    their_grads = torch.autograd.grad(theirs, list(policy.parameters()))

    plain = spin_step(policy, pairs, scale=BETA, kind="sigmoid").loss.mean()
    assert our_loss.item() - plain.item() == pytest.approx(alpha * ours.metrics["nll/real"].item(), rel=1e-5)
    assert ours.metrics["nll/real"].item() > 1.0  # an untrained model: the term is not negligible
    torch.testing.assert_close(our_loss, theirs, rtol=1e-5, atol=1e-5)
    for mine, trl in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, trl, rtol=1e-5, atol=1e-5)
