"""LSP's query sources and the difficulty knob: GRPO on data prompts (query_source=data), the seeded
resumable prompt order, config checks, per-query challenger prompts, and the signal metrics."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import small_model

from sparring.algorithms.lsp.prompts import (
    challenger_prompt,
    load_prompts,
    prompt_indices,
    query_difficulties,
    user_turn,
)
from sparring.algorithms.lsp.rollouts import Reference, policy_gradient, sample_rollouts, score_rewards
from sparring.config import ConfigError, LspConfig, LspRewardConfig, load_config
from sparring.data import encode
from sparring.data.records import DataError
from sparring.losses import lsp_advantages
from sparring.losses.lsp import group_signal
from sparring.rewards import ProvingGroundVerifier

TINY = "configs/lsp/tiny.yaml"


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(5)]
    rows.append({"prompt": "Reverse the word cat.", "completion": "tac"})
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 9 + 9?"}]})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_lsp(path, **kw) -> LspConfig:
    base = dict(num_queries=3, answers_per_query=2, answer_max_new_tokens=4, query_source="data",
                prompts=str(path), challenger_coef=0.0)
    return LspConfig(**{**base, **kw})


# ---------------------------------------------------------------- the prompt order


def test_prompt_order_uses_every_prompt_once_per_epoch_and_depends_only_on_seed_and_step():
    p, n = 7, 3
    order = [i for step in range(1, 15) for i in prompt_indices(p, n, seed=5, step=step)]  # 42 = 6 epochs
    for epoch in range(6):
        assert sorted(order[epoch * p : (epoch + 1) * p]) == list(range(p))
    assert order[:p] != order[p : 2 * p]  # a new permutation each epoch
    # a resumed run asks for step 9 alone and gets what the uninterrupted run drew at step 9
    assert prompt_indices(p, n, seed=5, step=9) == order[8 * n : 9 * n]
    assert prompt_indices(p, n, seed=6, step=1) != prompt_indices(p, n, seed=5, step=1)


def test_load_prompts_keeps_the_conversation_up_to_the_last_user_turn(prompts_file, tmp_path):
    prompts = load_prompts(str(prompts_file))
    assert len(prompts) == 7
    assert prompts[0] == user_turn("What is 0 + 1?")  # the reference answer is dropped
    assert prompts[5] == user_turn("Reverse the word cat.")
    assert prompts[6][0] == {"role": "system", "content": "Be brief."} and prompts[6][-1]["content"] == "What is 9 + 9?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="row 0"):
        load_prompts(str(bad))


def test_data_rollouts_take_the_steps_prompts_and_a_resume_repeats_them(tok, prompts_file):
    lsp = data_lsp(prompts_file)
    prompts = load_prompts(str(prompts_file))
    r = sample_rollouts(small_model(tok), tok, lsp, seed=2, step=4, batch_size=4, prompts=prompts)
    chosen = [prompts[i] for i in prompt_indices(len(prompts), 3, seed=2, step=4)]
    assert r.queries == [p[-1]["content"] for p in chosen]  # q_i for the reward: the last user turn
    assert r.solver_prompt_ids == [encode(tok, p)[0] for p in chosen]  # rendered whole (system turn included)
    assert len(r.answers) == 6 and r.challenger_prompt_ids == []
    again = sample_rollouts(small_model(tok), tok, lsp, seed=2, step=4, batch_size=4, prompts=prompts)
    assert again.queries == r.queries and again.answer_ids == r.answer_ids
    with pytest.raises(ValueError, match="needs the prompts"):
        sample_rollouts(small_model(tok), tok, lsp, seed=2, step=4, batch_size=4)


def test_grpo_on_data_prompts_has_no_challenger_loss(tok, prompts_file):
    from accelerate import Accelerator

    lsp = data_lsp(prompts_file)
    model, ref = small_model(tok, seed=1), small_model(tok, seed=1)
    r = sample_rollouts(model, tok, lsp, seed=0, step=1, batch_size=8, prompts=load_prompts(str(prompts_file)))
    scored = score_rewards(ProvingGroundVerifier(), r, LspRewardConfig())
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sol, ch = policy_gradient(model, Reference(copy=ref), r, lsp_advantages(rewards), lsp, pad_id=tok.pad_token_id,
                              batch_size=4, accelerator=Accelerator(cpu=True, mixed_precision="no"))
    assert ch is None and sol["kl"] == 0.0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert scored.rewards.shape == (3, 2)


@pytest.mark.parametrize("overrides, message", [
    (["lsp.query_source=data"], "needs lsp.prompts"),
    (["lsp.query_source=data", "lsp.prompts=p.jsonl"], "set lsp.challenger_coef=0"),
    (["lsp.query_source=data", "lsp.prompts=p.jsonl", "lsp.challenger_coef=0", "lsp.difficulties=['2']"],
     "does not use"),
    (["lsp.prompts=p.jsonl"], "only with lsp.query_source=data"),
    (["lsp.difficulties=['2', '3']"], "needs a {difficulty} slot"),
])
def test_config_refuses_source_combinations_that_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_config_accepts_grpo_on_data_and_a_difficulty_slot():
    cfg = load_config(TINY, ["lsp.query_source=data", "lsp.prompts=p.jsonl", "lsp.challenger_coef=0"])
    assert cfg.lsp.query_source == "data"
    cfg = load_config(TINY, ["lsp.challenger_prompt='Add two {difficulty}-digit numbers.'", "lsp.difficulties=['2', '3']"])
    assert cfg.lsp.difficulties == ["2", "3"]


# ---------------------------------------------------------------- the difficulty knob


def test_difficulties_are_cycled_over_the_queries_and_fill_their_prompts(tok):
    lsp = LspConfig(num_queries=5, answers_per_query=2, query_max_new_tokens=6, answer_max_new_tokens=4,
                    challenger_prompt="Add two {difficulty}-digit numbers.", difficulties=["2", "3"])
    assert query_difficulties(lsp) == ["2", "3", "2", "3", "2"]
    assert challenger_prompt(lsp, "3") == "Add two 3-digit numbers."
    assert challenger_prompt(lsp) == "Add two {difficulty}-digit numbers."  # no difficulty: left as written
    r = sample_rollouts(small_model(tok), tok, lsp, seed=0, step=1, batch_size=8)
    for i, (prompt, query_ids) in enumerate(r.challenger_sequences()):
        # the challenger is scored on its query conditioned on the prompt that asked for its difficulty
        assert prompt == encode(tok, user_turn(f"Add two {'23'[i % 2]}-digit numbers."))[0]
        assert query_ids == r.query_ids[i]
    assert query_difficulties(LspConfig(num_queries=2)) == [None, None]


# ---------------------------------------------------------------- signal metrics


def test_group_signal_marks_groups_whose_kept_rewards_differ():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    keep = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, False, True]])
    assert group_signal(rewards).tolist() == [False, True, False, True]
    assert group_signal(rewards, keep).tolist() == [False, True, False, False]  # the differing answer is dropped
    one_kept = torch.tensor([[True, False, False]] * 4)
    assert not group_signal(rewards, one_kept).any()


def test_group_signal_rate_matches_one_minus_p_to_the_g_minus_q_to_the_g():
    torch.manual_seed(0)
    p, g = 0.3, 4
    rewards = (torch.rand(20000, g) < p).double()
    assert group_signal(rewards).double().mean().item() == pytest.approx(1 - p**g - (1 - p) ** g, abs=0.01)


def test_step_metrics_log_signal_values_and_reward_per_difficulty():
    from sparring.algorithms.lsp import step_metrics
    from sparring.algorithms.lsp.rollouts import Rollouts

    queries = ["What is 10 + 10?", "What is 100 + 100?", "What is 11 + 11?", "nonsense"]
    answers = ["20", "21", "200", "200", "22", "22", "1", "2"]
    r = Rollouts([1], [[2]] * 4, queries, [[1]] * 4, [[3]] * 8, answers, [True] * 8)
    scored = score_rewards(ProvingGroundVerifier(), r, LspRewardConfig(invalid_query_reward=1.0))
    adv = lsp_advantages(scored.rewards)
    row = step_metrics(r, scored, adv, None, 0, {"kl": 0.0, "logps": 0.0, "loss": 0.0}, None, ["2", "3", "2", "3"])
    assert row["lsp/signal_frac"] == 0.25  # only the first group's answers disagree
    assert row["lsp/query_values"] == [0.5, 1.0, 1.0, 1.0]
    assert row["lsp/reward/difficulty=2"] == 0.75 and row["lsp/reward/difficulty=3"] == 1.0
    assert not any(k.startswith("lsp/reward/") for k in step_metrics(r, scored, adv, None, 0, {"kl": 0.0, "logps": 0.0, "loss": 0.0}, None))
