"""sparring's decoding loop (``generation.decode``) against transformers' ``model.generate``."""

from __future__ import annotations

import random

import pytest
import torch

from sparring.data import encode
from sparring.generation import HFGenerator, SamplingParams, decode
from sparring.tasks import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=2, heads=2, seed=3)
    with torch.no_grad():  # sharper logits: greedy answers that depend on the prompt and vary along the row
        for p in model.parameters():
            p.mul_(8)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh 123") for _ in range(rng.randint(1, 30))) for _ in range(19)]
    prompts = [encode(tok, [{"role": "user", "content": q}])[0] for q in texts]
    return tok, model, prompts


def stop_at_varied_steps(completions) -> int:
    """An id the rows first sample at many different steps (never first), so rows stop at different steps."""
    first: dict[int, set[int]] = {}
    for c in completions:
        seen: set[int] = set()
        for k, t in enumerate(c.token_ids):
            if t not in seen:
                first.setdefault(t, set()).add(k)
                seen.add(t)
    return max((t for t in first if 0 not in first[t]), key=lambda t: len(first[t]))


def test_greedy_equals_generate_with_ragged_prompts_grouped_prefill_and_rows_stopping_early(setup, monkeypatch):
    tok, model, prompts = setup
    assert len(prompts) > 2 * decode.PREFILL_ROWS and len({len(p) for p in prompts}) > 5
    greedy = SamplingParams.greedy(max_new_tokens=12)
    library = HFGenerator(model, tok, loop="generate")
    ours = HFGenerator(model, tok, loop="sparring")
    assert [c.token_ids for c in ours.generate(prompts, greedy, 0)] == \
        [c.token_ids for c in library.generate(prompts, greedy, 0)]

    stop = stop_at_varied_steps(library.generate(prompts, greedy, 0))
    params = SamplingParams(do_sample=False, max_new_tokens=12, stop_token_ids=(stop,))
    dropped = []
    select = decode._select_rows
    monkeypatch.setattr(decode, "_select_rows", lambda cache, keep: (dropped.append(len(keep)), select(cache, keep)))
    theirs, mine = library.generate(prompts, params, 0), ours.generate(prompts, params, 0)
    assert [c.token_ids for c in mine] == [c.token_ids for c in theirs]
    assert [c.finished for c in mine] == [c.finished for c in theirs]
    assert [c.text for c in mine] == [c.text for c in theirs]
    lengths = {len(c.token_ids) for c in mine if c.finished}
    assert len(lengths) >= 3 and not all(c.finished for c in mine)  # rows stopped at different steps, some never
    assert dropped and dropped[-1] < len(prompts)  # finished rows really left the batch


def test_grouped_prefill_fills_the_cache_as_one_padded_batch_does(setup, monkeypatch):
    """Each length group's keys and values land in its rows, right-aligned, as a prefill of the whole batch
    at once puts them (padding positions aside); the last-token logits too."""
    from transformers import StaticCache

    tok, model, prompts = setup
    width, new = max(len(p) for p in prompts), 4
    mask = torch.zeros(len(prompts), width + new, dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, width - len(p) : width] = 1
    runs = []
    for rows in (decode.PREFILL_ROWS, len(prompts)):  # groups of 8, then everything at once
        monkeypatch.setattr(decode, "PREFILL_ROWS", rows)
        cache = StaticCache(config=model.config, max_cache_len=width + new)
        with torch.inference_mode():
            logits = decode._prefill(model, decode._cache_keyword(model), cache, prompts, width, mask,
                                     tok.pad_token_id, torch.device("cpu"))
        runs.append((logits, cache))
    (grouped, a), (whole, b) = runs
    # float sums over other padding widths: equal to float32 rounding at these (×8) weights' scale
    torch.testing.assert_close(grouped, whole, rtol=1e-4, atol=1e-4)
    real = mask.bool()[:, None, :, None]
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert int(la.cumulative_length) == int(lb.cumulative_length) == width
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            torch.testing.assert_close(x * real, y * real, rtol=1e-4, atol=1e-4)


def test_greedy_equals_generate_on_a_sliding_window_model():
    """Mistral with a 4-token window: the cache's sliding layers (prefilled at once, then rolled)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    prompts = [encode(tok, [{"role": "user", "content": "ab" * n}])[0] for n in range(1, 12)]
    greedy = SamplingParams.greedy(max_new_tokens=10)
    assert decode.supported(model)
    assert [c.token_ids for c in HFGenerator(model, tok, loop="sparring").generate(prompts, greedy, 0)] == \
        [c.token_ids for c in HFGenerator(model, tok, loop="generate").generate(prompts, greedy, 0)]


def test_greedy_equals_generate_through_a_peft_model(setup):
    peft = pytest.importorskip("peft")
    tok, model, prompts = setup
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        assert decode.supported(lora)
        greedy = SamplingParams.greedy(max_new_tokens=8)
        assert [c.token_ids for c in HFGenerator(lora, tok, loop="sparring").generate(prompts, greedy, 0)] == \
            [c.token_ids for c in HFGenerator(lora, tok, loop="generate").generate(prompts, greedy, 0)]
    finally:
        lora.unload()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.9),
                                                     (0.6, 20, 0.5), (1.3, 5, 0.95), (1.0, 0, 0.02)])
def test_warp_gives_the_probabilities_of_generate_s_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(6, 300) * 3
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    expected = warpers(None, logits.clone()).softmax(-1)
    probs, ids = decode.warp(logits, temperature, top_k, top_p)
    got = torch.zeros_like(logits).scatter_add_(-1, ids, probs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sampled_tokens_follow_the_warped_distribution():
    torch.manual_seed(2)
    logits = torch.randn(1, 50) * 2
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    draws = decode.next_tokens(logits.expand(20000, -1), params, torch.Generator().manual_seed(0))
    probs, ids = decode.warp(logits, 0.8, 6, 0.9)
    expected = torch.zeros(50).scatter_add_(0, ids[0], probs[0])
    seen = torch.bincount(draws, minlength=50).double() / len(draws)
    assert set(draws.unique().tolist()) == set(expected.nonzero()[:, 0].tolist())
    assert (seen - expected.double()).abs().max() < 0.015  # 20,000 draws: standard error ≤ 0.0036


def test_a_batch_s_samples_are_fixed_by_its_seed_not_by_the_global_rng(setup):
    tok, model, prompts = setup
    gen = HFGenerator(model, tok, loop="sparring")
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    torch.manual_seed(0)
    a = gen.generate(prompts, params, seed=4)
    torch.manual_seed(99)
    assert [c.token_ids for c in gen.generate(prompts, params, seed=4)] == [c.token_ids for c in a]
    assert [c.token_ids for c in gen.generate(prompts, params, seed=5)] != [c.token_ids for c in a]


def test_loop_choice_is_checked():
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=2, seed=0)
    with pytest.raises(ValueError, match="loop must be"):
        HFGenerator(model, tok, loop="fast")
    assert HFGenerator(model, tok).loop == "auto" and decode.supported(model)
