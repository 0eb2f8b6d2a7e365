"""train.share_prompt: each method's loss step on SharedPrompt batches equals the one on separate sequences
(loss rtol 1e-5, every parameter gradient rtol 1e-4), on ragged prompts and responses."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sparring.algorithms.spin import PairRecord, collate_pairs, spin_step
from sparring.algorithms.tpaw import TeamRecord, collate_team, tpaw_step
from sparring.algorithms.tspin import TripletRecord, collate_triplets, tspin_step

VOCAB = 500
LENGTHS = [(3, 9, 2, 5), (17, 2, 11, 1), (1, 5, 5, 7), (8, 1, 1, 1)]  # prompt, y, y′, y₀


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


def token_rows():
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths] for lengths in LENGTHS]


def spin_records():
    return [PairRecord(p, y, g, -3.0 - i, -4.0 + i) for i, (p, y, g, _) in enumerate(token_rows())]


def tspin_records():
    return [TripletRecord(p, y, g, z) for p, y, g, z in token_rows()]


def tpaw_records():
    return [TeamRecord(p, y, g, [-3.0 - i, -2.5], [-4.0 + i, -5.0], [True, i % 2 == 0])
            for i, (p, y, g, _) in enumerate(token_rows())]


CASES = {
    "spin": (spin_records, collate_pairs, partial(spin_step, scale=0.1, kind="sigmoid", nll_coef=0.5)),
    "tspin": (tspin_records, collate_triplets, partial(tspin_step, scale=0.1, history_weight=0.3, kind="sigmoid")),
    "tpaw": (tpaw_records, collate_team, partial(tpaw_step, average=True, nll_coef=0.5, scale=0.1, eta=1.0, gamma=1.0,
                                                  detach_player_weights=True)),
}


@pytest.mark.parametrize("method", list(CASES))
def test_a_shared_prompt_gives_each_methods_loss_and_gradients(method):
    records, collate, step = CASES[method]
    results = []
    for share in (False, True):
        m = model()
        out = step(m, collate(records(), 0, share_prompt=share))
        out.loss.mean().backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for key, value in plain.metrics.items():
        torch.testing.assert_close(shared.metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_shared_batch_holds_each_prompt_once_and_counts_its_real_tokens():
    from sparring.training.loop import batch_tokens

    records = spin_records()
    plain, shared = (collate_pairs(records, 0, share_prompt=s).sequences for s in (False, True))
    assert shared.input_ids.shape[0] == len(records) and plain.input_ids.shape[0] == 2 * len(records)
    prompts = sum(len(r.prompt_ids) for r in records)
    assert int(shared.attention_mask.sum()) == int(plain.attention_mask.sum()) - prompts + len(records)  # + a copy
    assert batch_tokens(collate_pairs(records, 0, share_prompt=True)) == int(shared.attention_mask.sum())


def test_the_runs_share_the_prompt_unless_it_is_off_or_the_attention_takes_no_4d_mask(capsys):
    from types import SimpleNamespace

    from sparring.config import RunConfig
    from sparring.stages import shares_prompt

    m, s, cfg = model(), SimpleNamespace(main=True), RunConfig()
    assert cfg.train.share_prompt and shares_prompt(s, cfg, m)
    cfg.train.share_prompt = False
    assert not shares_prompt(s, cfg, m)
    cfg.train.share_prompt, m.config._attn_implementation = True, "flash_attention_2"
    assert not shares_prompt(s, cfg, m)
    assert "train.share_prompt is off for this model: its attention (flash_attention_2)" in capsys.readouterr().out
