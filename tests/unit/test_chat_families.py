"""Token-exact sequences on real tokenizer families (SentencePiece Llama/Zephyr, ChatML Qwen, Llama-3).

Each family is built locally (tests/tokenizer_families.py). For each: the prefix property on
multi-turn conversations with system prompts and unicode, one BOS, the response closed at the
template's end of turn, generation stopping there, and a y′ equal in text to y encoded like y.
"""

from __future__ import annotations

import pytest
import torch
from tests.tokenizer_families import CONVERSATIONS, END_OF_TURN, FAMILIES, build_family

from sparring.config import DataConfig, ModelConfig
from sparring.data import NotAPrefixError, encode, render_prompt, tokenize
from sparring.data.dataset import load_training_set
from sparring.generation import HFGenerator, SamplingParams
from sparring.logprobs import collate, sequence_logps
from sparring.modeling import load_model, load_tokenizer
from sparring.state import write_jsonl

BOS = {"sentencepiece_llama": "<s>", "chatml_bpe": None, "llama3": "<|begin_of_text|>"}
# ChatML: a response starting with "\n" merges with the generation prompt's final "\n" into one token.
NOT_A_PREFIX = {("chatml_bpe", 5)}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    folder = build_family(request.param, tmp_path_factory.mktemp(request.param))
    cfg = ModelConfig(name_or_path=str(folder), dtype="float32")
    return request.param, load_tokenizer(cfg), cfg


def cases(name):
    return [(k, c) for k, c in enumerate(CONVERSATIONS) if (name, k) not in NOT_A_PREFIX]


def test_prompt_ids_are_a_prefix_and_the_response_is_its_continuation_in_context(family):
    name, tok, _ = family
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for _, conv in cases(name):
        prompt, real = conv[:-1], conv[-1]["content"]
        prompt_ids, response_ids = encode(tok, prompt, real)
        full_ids = tokenize(tok, tok.apply_chat_template(conv, tokenize=False))
        assert full_ids[: len(prompt_ids) + len(response_ids)] == prompt_ids + response_ids
        assert response_ids[-1] == eot and eot not in response_ids[:-1]  # closed once, at the end of turn
        # unicode, spaces and newlines survive, nothing stripped (decoded in context: a SentencePiece
        # decoder drops the leading space of a text that starts with one)
        assert tok.decode(prompt_ids + response_ids[:-1]).endswith(real)
        bos = tok.convert_tokens_to_ids(BOS[name]) if BOS[name] else None
        if bos is None:
            assert tok.bos_token_id is None or prompt_ids[0] != tok.bos_token_id
        else:  # one BOS, whether the template writes it (Llama-3) or the tokenizer adds it (Zephyr)
            assert prompt_ids[0] == bos and prompt_ids[1] != bos


def test_the_response_is_not_tokenized_alone(family):
    """Separately tokenized, a SentencePiece response starts with a "▁" piece never seen in context."""
    name, tok, _ = family
    prompt, real = [{"role": "user", "content": "Hi"}], "Hello there"
    _, response_ids = encode(tok, prompt, real)
    alone = tok(real + END_OF_TURN[name], add_special_tokens=False)["input_ids"]
    if name == "sentencepiece_llama":
        assert tok.convert_ids_to_tokens(alone[0]).startswith("▁")
        assert not tok.convert_ids_to_tokens(response_ids[0]).startswith("▁")
        assert response_ids != alone
    else:  # byte-level BPE adds no prefix: here the two agree, so the trap is SentencePiece's alone
        assert response_ids == alone


def test_a_prompt_that_is_not_a_token_prefix_is_a_bad_row_counted_or_refused(family, tmp_path):
    name, tok, _ = family
    rows = [{"messages": c} for c in CONVERSATIONS]
    write_jsonl(tmp_path / "d.jsonl", rows)
    bad = [k for k in range(len(CONVERSATIONS)) if (name, k) in NOT_A_PREFIX]
    skipped = load_training_set(DataConfig(source=str(tmp_path / "d.jsonl"), on_bad_row="skip",
                                           max_prompt_length=500, max_length=1000), tok)
    assert sum(skipped.report.skipped.values()) == len(bad) and len(skipped.examples) == len(rows) - len(bad)
    for k in bad:
        with pytest.raises(NotAPrefixError):
            encode(tok, CONVERSATIONS[k][:-1], CONVERSATIONS[k][-1]["content"])
        with pytest.raises(ValueError, match=f"row {k}: the tokenized prompt is not a prefix"):
            load_training_set(DataConfig(source=str(tmp_path / "d.jsonl"), max_prompt_length=500,
                                         max_length=1000), tok)


def memorize(model, ids: list[int], steps: int = 150) -> None:
    """Overfit ``model`` on one sequence, so that greedy decoding reproduces it."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_generation_stops_at_the_end_of_turn_and_a_y_prime_equal_to_y_has_its_ids_and_log_prob(family):
    """The model is taught y then an invented next turn; generation must stop at the end-of-turn token
    (for ChatML and Llama-3 it is not the tokenizer's EOS), and the sampled ids equal y's."""
    name, tok, cfg = family
    model = load_model(cfg)
    prompt, real = CONVERSATIONS[1][:-1], CONVERSATIONS[1][-1]["content"]
    prompt_ids, real_ids = encode(tok, prompt, real)
    follow = encode(tok, [*prompt, {"role": "assistant", "content": real}, {"role": "user", "content": "Again?"}])[0]
    assert follow[: len(prompt_ids) + len(real_ids)] == prompt_ids + real_ids
    memorize(model, follow)  # y, then the template's glue and a next user turn
    out = HFGenerator(model, tok).generate([prompt_ids], SamplingParams.greedy(max_new_tokens=40), seed=0)[0]
    assert out.finished and out.token_ids == real_ids and out.text == real
    batch = collate([(prompt_ids, out.token_ids), (prompt_ids, real_ids)], tok.pad_token_id)
    lp = sequence_logps(model, batch)
    assert lp[0].item() == lp[1].item()
    # A turn cut at max_new_tokens is reported as truncated, without an end of turn.
    cut = HFGenerator(model, tok).generate([prompt_ids], SamplingParams.greedy(max_new_tokens=2), seed=0)[0]
    assert not cut.finished and cut.token_ids == real_ids[:2]


def test_generation_prompt_renders_as_the_model_was_trained(family):
    name, tok, _ = family
    text = render_prompt(tok, [{"role": "user", "content": "x"}])
    assert not text.endswith(" ")
