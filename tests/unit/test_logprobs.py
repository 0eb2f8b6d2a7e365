"""The one log-prob function on hand-built padded batches."""

from __future__ import annotations

import math

import pytest
import torch
from tests.unit.table_lm import TableModel

from sparring.logprobs import collate, sequence_logps, token_logps


def by_hand(model: TableModel, prompt: list[int], response: list[int]) -> float:
    seq = prompt + response
    logp = torch.log_softmax(model.table, dim=-1)
    return sum(logp[seq[t - 1], seq[t]].item() for t in range(len(prompt), len(seq)))


def test_collate_right_pads_and_marks_response_tokens():
    batch = collate([([1, 2], [3]), ([4], [5, 1, 2])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 1, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_sequence_logps_sum_only_response_tokens_excluding_prompt_and_padding():
    model = TableModel()
    pairs = [([1, 2], [3]), ([4], [5, 1, 2]), ([2, 2, 2], [1, 1])]
    batch = collate(pairs, pad_id=0)
    got = sequence_logps(model, batch)
    expected = torch.tensor([by_hand(model, p, r) for p, r in pairs], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # Changing a padding id or a prompt-independent position outside the mask changes nothing.
    batch2 = batch._replace(input_ids=batch.input_ids.clone())
    batch2.input_ids[0, 3] = 5  # padding position of row 0
    torch.testing.assert_close(sequence_logps(model, batch2), got)
    mean = sequence_logps(model, batch, average=True)
    torch.testing.assert_close(mean.double(), expected / torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))


def test_token_logps_are_zero_outside_the_response():
    model = TableModel()
    batch = collate([([1, 2], [3]), ([4], [5, 1, 2])], pad_id=0)
    per_token = token_logps(model(batch.input_ids).logits, batch.input_ids, batch.response_mask)
    assert per_token.shape == (2, 3)
    assert (per_token[0, [0, 2]] == 0).all() and per_token[0, 1] < 0
    assert (per_token[1] < 0).all()


def test_longer_response_with_same_per_token_logprob_scales_linearly():
    # A uniform model: every token has log-prob −log V, so L = −n·log V (spec SPIN fact 8).
    model = TableModel()
    with torch.no_grad():
        model.table.zero_()
    batch = collate([([1], [2, 3]), ([1], [2, 3, 4, 5])], pad_id=0)
    got = sequence_logps(model, batch)
    torch.testing.assert_close(got.double(), torch.tensor([-2 * math.log(6), -4 * math.log(6)], dtype=torch.float64))


def test_padding_does_not_change_a_real_model_logps():
    from sparring.tasks import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=2)
    pairs = [([5, 6, 7, 8, 9], [10, 11]), ([5], [12, 13, 14, 15, 16, 17])]
    together = sequence_logps(model, collate(pairs, tok.pad_token_id))
    alone = torch.cat([sequence_logps(model, collate([p], tok.pad_token_id)) for p in pairs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_token_logps_at_a_temperature_are_those_of_the_tempered_softmax():
    # LSP samples from softmax(logits / T); its REINFORCE and KL terms need the same distribution.
    model = TableModel()
    pairs = [([1, 2], [3]), ([4], [5, 1, 2])]
    batch = collate(pairs, pad_id=0)
    logits = model(batch.input_ids).logits
    tempered = token_logps(logits, batch.input_ids, batch.response_mask, temperature=0.5)  # (B, T−1)
    hand = torch.log_softmax(model.table / 0.5, dim=-1)
    for b, (p, r) in enumerate(pairs):
        seq = p + r
        for t in range(len(p), len(seq)):
            assert tempered[b, t - 1].item() == pytest.approx(hand[seq[t - 1], seq[t]].item(), rel=1e-6)
    assert tempered[0, 0] == 0 and tempered[0, 2] == 0  # still zero outside the response
    torch.testing.assert_close(sequence_logps(model, batch, temperature=0.5), tempered.sum(-1))
    # T = 1 is the default and changes nothing
    torch.testing.assert_close(token_logps(logits, batch.input_ids, batch.response_mask, temperature=1.0),
                               token_logps(logits, batch.input_ids, batch.response_mask), rtol=0, atol=0)


def test_optimized_logps_equal_the_plain_computation_on_a_bpe_vocab_model_with_ragged_lengths():
    """Response-only LM head + chunked log-softmax == full logits + full float32 log-softmax: values
    rtol 1e-5, every parameter gradient rtol 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 8000  # BPE-sized, so the chunked log-softmax splits the window into several chunks
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 9), (17, 2), (8, 14), (1, 5), (25, 11)]  # ragged prompts and responses
    pairs = [(torch.randint(1, vocab, (p,), generator=g).tolist(), torch.randint(1, vocab, (r,), generator=g).tolist())
             for p, r in lengths]

    batch = collate(pairs, 0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    plain = (token * batch.response_mask[:, 1:]).sum(-1)
    plain.sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    import sparring.logprobs as lp

    chunked = lp.selective_logps
    lp.selective_logps = lambda *a, **k: chunked(*a, **{**k, "chunk_elements": vocab * 4})  # 4 positions a chunk
    try:
        fast = sequence_logps(model, batch)
    finally:
        lp.selective_logps = chunked
    fast.sum().backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(lp.plain_sequence_logps(model, batch), plain.detach(), rtol=1e-5, atol=1e-5)
    assert int(lp.scored_positions(batch).sum()) == sum(r for _, r in lengths)  # the LM head's 41 of 5 × 36 positions


def test_selective_log_softmax_gradient_is_exact():
    from sparring.logprobs import selective_logps

    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    for temperature in (1.0, 0.7):
        def fn(x, temperature=temperature):  # chunks of two positions
            return selective_logps(x, targets, temperature=temperature, chunk_elements=2 * 7 * 2)

        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-5)
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
        torch.testing.assert_close(fn(logits), expected, rtol=1e-6, atol=1e-6)


def test_a_shared_prompt_scores_every_response_as_its_own_sequence_does_values_and_gradients():
    """[x, y, x_last, y′, x_last, y₀] in one row with the attention bias == (x, y), (x, y′), (x, y₀) apart:
    values rtol 1e-5, every parameter gradient rtol 1e-4, on a BPE-sized vocabulary with ragged lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparring.logprobs import collate_shared, shared_prompt_logps

    torch.manual_seed(0)
    vocab = 8000
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    rows = [(ids(p), [ids(a), ids(b), ids(c)]) for p, a, b, c in [(3, 9, 2, 5), (17, 2, 11, 1), (1, 5, 5, 7), (8, 1, 1, 1)]]
    apart = sequence_logps(model, collate([(p, r) for p, rs in rows for r in rs], 0)).view(len(rows), 3)
    apart.sum().backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    batch = collate_shared(rows, 0)
    assert batch.input_ids.shape[1] == max(len(p) + sum(map(len, rs)) + 2 for p, rs in rows)  # x once, + 2 copies
    shared = shared_prompt_logps(model, batch, 3)
    shared.sum().backward()
    torch.testing.assert_close(shared, apart.detach(), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    lengths = torch.tensor([[len(r) for r in rs] for _, rs in rows], dtype=shared.dtype)
    torch.testing.assert_close(shared_prompt_logps(model, batch, 3, average=True), (shared / lengths).detach(),
                               rtol=1e-5, atol=1e-6)
    model.config._attn_implementation = "flash_attention_2"  # ignores a 4D mask: refused, never a silent mix
    with pytest.raises(ValueError, match="train.share_prompt needs an attention that takes a 4D mask"):
        shared_prompt_logps(model, batch, 3)
