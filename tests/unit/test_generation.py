"""The Hugging Face generator and the resumable generation stage."""

from __future__ import annotations

import pytest

from sparring.config import GenerationConfig
from sparring.data import encode
from sparring.generation import Completion, HFGenerator, SamplingParams, batch_seed, generate_responses
from sparring.tasks import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=2, seed=3)
    prompts = [encode(tok, [{"role": "user", "content": q}])[0]
               for q in ["What is 1 + 2?", "Sort the digits 4 2 9 1 7.", "Reverse the word ab."]]
    return tok, model, prompts


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(setup):
    tok, model, prompts = setup
    gen = HFGenerator(model, tok)
    params = SamplingParams.greedy(max_new_tokens=8)
    together = gen.generate(prompts, params, seed=0)
    alone = [gen.generate([p], params, seed=0)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(isinstance(c, Completion) and len(c.token_ids) <= 8 for c in together)
    # A finished completion ends with its stop id, once; nothing after it (padding) is kept.
    assert all(tok.eos_token_id not in c.token_ids[:-1] and tok.pad_token_id not in c.token_ids for c in together)
    assert all((c.token_ids[-1] == tok.eos_token_id) == c.finished for c in together)


def test_sampling_is_fixed_by_the_seed_and_ignores_the_checkpoint_generation_config(setup):
    tok, model, prompts = setup
    gen = HFGenerator(model, tok)
    params = SamplingParams.from_config(GenerationConfig(temperature=1.0, max_new_tokens=10))
    a = gen.generate(prompts, params, seed=11)
    assert [c.token_ids for c in a] == [c.token_ids for c in gen.generate(prompts, params, seed=11)]
    assert [c.token_ids for c in a] != [c.token_ids for c in gen.generate(prompts, params, seed=12)]
    model.generation_config.top_k = 1  # a checkpoint's settings must not leak into sampling
    model.generation_config.temperature = 0.01
    try:
        assert [c.token_ids for c in gen.generate(prompts, params, seed=11)] == [c.token_ids for c in a]
    finally:
        model.generation_config.top_k = 50
        model.generation_config.temperature = 1.0


class Counting:
    def __init__(self, inner):
        self.inner, self.batches = inner, 0

    def generate(self, prompts, params, seed):
        self.batches += 1
        return self.inner.generate(prompts, params, seed)


def test_generation_stage_keeps_prompt_order_and_skips_finished_batches(setup, tmp_path):
    tok, model, prompts = setup
    prompts = prompts * 3  # 9 prompts, batches of 4 -> 3 chunks
    params = SamplingParams(max_new_tokens=6)
    first = Counting(HFGenerator(model, tok))
    rows = generate_responses(first, prompts, params, folder=tmp_path, seed=5, batch_size=4)
    assert first.batches == 3 and [r["index"] for r in rows] == list(range(9))
    (tmp_path / "chunk-000001.jsonl").unlink()  # as if killed while batch 1 was in flight
    again = Counting(HFGenerator(model, tok))
    rows2 = generate_responses(again, prompts, params, folder=tmp_path, seed=5, batch_size=4)
    assert again.batches == 1 and rows2 == rows  # only the lost batch is redone, with the same samples


def test_generation_chunks_of_another_layout_are_recomputed_never_mixed_in(setup, tmp_path):
    """A resume with another batch size or other settings (``--force``) must not reuse old chunks."""
    tok, model, prompts = setup
    prompts = prompts * 3
    params = SamplingParams(max_new_tokens=6)
    generate_responses(HFGenerator(model, tok), prompts, params, folder=tmp_path / "a", seed=5, batch_size=4)
    (tmp_path / "a" / "chunk-000002.jsonl").unlink()
    again = Counting(HFGenerator(model, tok))
    mixed = generate_responses(again, prompts, params, folder=tmp_path / "a", seed=5, batch_size=3)
    fresh = generate_responses(HFGenerator(model, tok), prompts, params, folder=tmp_path / "b", seed=5, batch_size=3)
    assert again.batches == 3 and mixed == fresh
    other = generate_responses(HFGenerator(model, tok), prompts, SamplingParams(max_new_tokens=2),
                               folder=tmp_path / "a", seed=5, batch_size=3)
    assert all(len(r["token_ids"]) <= 2 for r in other)


def test_batch_seed_depends_on_every_part():
    assert batch_seed(42, "generated", 0, 3) == batch_seed(42, "generated", 0, 3)
    seeds = {batch_seed(42, "generated", 0, 3), batch_seed(42, "generated", 1, 3),
             batch_seed(42, "proto", 0, 3), batch_seed(43, "generated", 0, 3), batch_seed(42, "generated", 0, 4)}
    assert len(seeds) == 5


def test_top_k_zero_really_samples_from_the_whole_vocabulary():
    """transformers 5 fills top_k=None with its default 50: "off" must reach generate as 0."""
    import torch

    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=2, seed=0)
    with torch.no_grad():  # a near-uniform next-token distribution with distinct logits (ties defeat top-k)
        model.get_output_embeddings().weight.mul_(0.01)
    prompts = [encode(tok, [{"role": "user", "content": "x"}])[0]] * 600
    params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=1)
    firsts = {c.token_ids[0] for c in HFGenerator(model, tok).generate(prompts, params, seed=0)}
    assert len(firsts) > 60  # top-50 sampling could give at most 50 distinct tokens
