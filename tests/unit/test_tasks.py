"""The proving ground's task families: every generated problem is solved and checked by the program."""

from __future__ import annotations

import random

import pytest

from sparring.tasks.problems import ALL_FAMILIES, check, difficulty_of, make_problem, make_rows, solve


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_problem_of_a_family_is_parsed_and_checked(family):
    rng = random.Random(1)
    for _ in range(50):
        query, answer = make_problem(rng, family)
        assert solve(query) == answer and check(query, f" {answer}\n") is True and check(query, answer + "0") is False


def test_add_lsd_writes_the_sum_least_significant_digit_first():
    assert solve("What is 347 + 58, least significant digit first?") == "504"  # 405 backwards
    assert solve("What is 5 + 5, least significant digit first?") == "01"
    assert solve("What is 5 + 5?") == "10" and solve("Add 5 and 5.") is None


def test_rows_cycle_through_the_families_without_repeats():
    rows = make_rows(40, seed=3, families=ALL_FAMILIES)
    queries = [r["messages"][0]["content"] for r in rows]
    assert len(set(queries)) == 40 and "least significant digit first" in queries[3]


def test_default_difficulty_draws_exactly_the_problems_of_before():
    # the first rows of a fixed seed as drawn before the difficulty knob existed (other experiments rely on them)
    rows = make_rows(4, seed=7, families=("add_lsd", "add", "sort", "reverse"))
    assert [r["messages"][0]["content"] for r in rows] == make_rows_reference()
    assert make_rows(30, seed=2) == make_rows(30, seed=2, difficulty=None)


def make_rows_reference() -> list[str]:
    rng = random.Random(7)
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    first = f"What is {a} + {b}, least significant digit first?"
    c, d = rng.randint(0, 99), rng.randint(0, 99)
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    return [first, f"What is {c} + {d}?", f"Sort the digits {' '.join(digits)}.", f"Reverse the word {word}."]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_difficulty_fixes_the_size_and_is_read_back(family, d):
    rng = random.Random(d)
    for _ in range(30):
        query, answer = make_problem(rng, family, difficulty=d)
        assert solve(query) == answer and difficulty_of(query) == d
    if family in ("add", "add_lsd"):
        numbers = [int(x) for x in query.replace(",", " ").replace("?", " ").split() if x.isdigit()]
        assert all(len(str(n)) == d for n in numbers)


def test_difficulty_of_unparseable_is_none_and_bad_difficulties_are_refused():
    assert difficulty_of("What is 5 + 123?") == 3 and difficulty_of("Tell me a joke.") is None
    with pytest.raises(ValueError, match="out of range"):
        make_problem(random.Random(0), "add", difficulty=0)
    with pytest.raises(ValueError, match="cannot draw"):
        make_rows(200, seed=0, families=("add",), difficulty=1)  # only 100 one-digit sums exist


def test_sft_stops_at_the_first_evaluation_reaching_the_target():
    from sparring.data import encode
    from sparring.tasks.sft import challenger_pairs, sft_steps
    from sparring.tasks.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=16, layers=1, heads=2)
    encoded = challenger_pairs(tok, [("Ask.", "What is 1 + 1?")] * 4)
    assert encoded[0] == encode(tok, [{"role": "user", "content": "Ask."}], "What is 1 + 1?")
    scores = iter([0.1, 0.5, 0.2, 0.9])
    history = sft_steps(model, tok, encoded, steps=8, lr=1e-3, batch_size=2, seed=0,
                        evaluate=lambda m: next(scores), eval_every=2, stop_at=0.4)
    assert [h["step"] for h in history] == [2, 4]  # stopped at 0.5 ≥ 0.4, not trained on


def _plain_sft(model, tokenizer, encoded, *, steps, lr, batch_size, seed):
    """The proving ground's SFT as a plain PyTorch loop (the loop tasks/sft.py had before the step engine)."""
    import math

    import torch

    from sparring.logprobs import collate, sequence_logps

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = collate(rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id)
        loss = -sequence_logps(model, batch).sum() / batch.response_mask[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def test_sft_on_the_step_engine_equals_a_plain_training_loop():
    import torch

    from sparring.data import encode
    from sparring.tasks.problems import make_rows
    from sparring.tasks.sft import sft_steps
    from sparring.tasks.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    rows = make_rows(12, seed=0, families=("add", "reverse"))
    encoded = [encode(tok, r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]  # ragged lengths
    engine_model, plain_model = (build_tiny_model(tok, hidden_size=16, layers=1, heads=2, seed=3) for _ in range(2))
    sft_steps(engine_model, tok, encoded, steps=9, lr=3e-3, batch_size=4, seed=1)
    _plain_sft(plain_model, tok, encoded, steps=9, lr=3e-3, batch_size=4, seed=1)
    for (name, a), b in zip(engine_model.state_dict().items(), plain_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(engine_model.state_dict()["lm_head.weight"],
                           build_tiny_model(tok, hidden_size=16, layers=1, heads=2, seed=3).state_dict()["lm_head.weight"])
