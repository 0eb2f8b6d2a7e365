"""LSP's loop pieces on real (tiny, random) model rollouts: config checks, the verifier, conditioning of
the two roles, KL = 0 at θ = θ_Ref, the frozen reference, and the α_Ch = 0 reduction to GRPO."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sparring.config import ConfigError, LspConfig, load_config
from sparring.data import encode
from sparring.losses import lsp_advantages, lsp_loss
from sparring.lsp_rollouts import (
    CHALLENGER_PROMPT,
    Reference,
    Rollouts,
    challenger_prompt,
    policy_gradient,
    sample_rollouts,
    score_rewards,
    user_turn,
)
from sparring.rewards import ProvingGroundVerifier, RewardBatch
from sparring.tasks import build_tiny_model, build_tokenizer

TINY = "configs/lsp/tiny.yaml"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_model(tok, seed=0):
    return build_tiny_model(tok, hidden_size=32, layers=1, heads=2, seed=seed)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no", cpu=True)


def small_lsp(**kw) -> LspConfig:
    base = dict(num_queries=3, answers_per_query=2, query_max_new_tokens=8, answer_max_new_tokens=6,
                challenger_prompt="Ask one question.")
    return LspConfig(**{**base, **kw})


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override", ["lsp.num_queries=1", "lsp.answers_per_query=1"])
def test_config_refuses_one_query_or_one_answer(override):
    with pytest.raises(ConfigError, match="num_queries >= 2 and lsp.answers_per_query >= 2"):
        load_config(TINY, [override])


def test_config_needs_the_chosen_reward():
    with pytest.raises(ConfigError, match="reward.reward_model"):
        load_config(TINY, ["lsp.reward.kind=reward_model"])
    with pytest.raises(ConfigError, match="reward.function"):
        load_config(TINY, ["lsp.reward.kind=function"])
    assert load_config(TINY, ["lsp.num_queries=2", "lsp.answers_per_query=2"]).lsp.num_queries == 2


# ---------------------------------------------------------------- verifier


def test_verifier_scores_right_wrong_and_unparseable():
    verifier = ProvingGroundVerifier()
    batch = verifier(
        ["What is 47 + 38?", "What is 47 + 38?", "Sort the digits 7 3 9 1.", "Reverse the word plum.", "Tell me a joke.", ""],
        ["85", "84", "1 3 7 9", " mulp ", "ha", "1"],
    )
    assert batch.scores == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert batch.valid == [True, True, True, True, False, False]
    assert verifier.score("What is 1 + 1?", "2") == 1.0
    with pytest.raises(ValueError, match="could not judge"):
        verifier.score("What is one plus one?", "2")


def test_invalid_queries_get_the_configured_reward():
    r = Rollouts([1], [[2], [3]], ["What is 1 + 1?", "gibberish"], [[1], [1]], [[4]] * 4, ["2", "3", "2", "3"], [True] * 4)
    rewards, batch = score_rewards(ProvingGroundVerifier(), r, invalid_reward=0.25)
    assert rewards.tolist() == [[1.0, 0.0], [0.25, 0.25]]
    assert batch.valid == [True, True, False, False]


# ---------------------------------------------------------------- challenger prompt


def test_challenger_prompt_fills_slots_and_keeps_the_four_parts():
    text = challenger_prompt(LspConfig(task="Pure & Applied Mathematics", template="Solve {equation}."))
    assert 'task "Pure & Applied Mathematics"' in text
    assert "[Start Generation]\nSolve {equation}.\n[End Generation]" in text
    assert "{ice cream flavor}" in text and "{task}" not in text and "{template}" not in text
    for part in ("A language task", "Your request", "Details", "Final remarks", "own judgement"):
        assert part in text
    assert challenger_prompt(LspConfig()).count('"None"') == 2  # both empty: the model's own judgement
    assert challenger_prompt(LspConfig(challenger_prompt="Write a {task}.", task="riddle")) == "Write a riddle."
    assert CHALLENGER_PROMPT.count("{task}") == 2


# ---------------------------------------------------------------- rollouts on a real model


def test_challenger_is_conditioned_on_cp_and_solver_is_not(tok):
    lsp = small_lsp(challenger_prompt="Ask one new question.")
    r = sample_rollouts(tiny_model(tok), tok, lsp, seed=1, step=3, batch_size=4)
    cp_ids = encode(tok, user_turn("Ask one new question."))[0]
    assert len(r.queries) == 3 and len(r.answers) == 6 and r.group_size == 2
    for (prompt, query_ids), q in zip(r.challenger_sequences(), r.queries):
        assert prompt == cp_ids and "Ask one new question." in tok.decode(prompt)
        assert tok.decode(query_ids, skip_special_tokens=True).strip() == q
    for k, (prompt, answer_ids) in enumerate(r.solver_sequences()):
        query = r.queries[k // 2]
        assert prompt == encode(tok, user_turn(query))[0]  # the query alone, as a user turn
        assert "Ask one new question." not in tok.decode(prompt)
        assert answer_ids == r.answer_ids[k]
    # seeded by (seed, step, role): the same step redraws the same rollouts, another step does not
    again = sample_rollouts(tiny_model(tok), tok, lsp, seed=1, step=3, batch_size=4)
    assert again.query_ids == r.query_ids and again.answer_ids == r.answer_ids
    other = sample_rollouts(tiny_model(tok), tok, lsp, seed=1, step=4, batch_size=4)
    assert other.query_ids != r.query_ids


@pytest.mark.parametrize("estimator", ["k3", "reward"])
def test_kl_is_exactly_zero_at_initialisation(tok, accelerator, estimator):
    lsp = small_lsp(kl_estimator=estimator)
    model = tiny_model(tok)
    reference = Reference(copy=tiny_model(tok))
    r = sample_rollouts(model, tok, lsp, seed=0, step=1, batch_size=8)
    adv = lsp_advantages(torch.rand(3, 2, dtype=torch.float64))
    sol, ch = policy_gradient(model, reference, r, adv, lsp, pad_id=tok.pad_token_id, batch_size=2,
                              accelerator=accelerator)
    assert sol["kl"] == 0.0 and ch["kl"] == 0.0
    # a perturbed policy has a non-zero KL (the check above can fail)
    with torch.no_grad():
        next(model.parameters()).add_(0.05)
    model.zero_grad()
    sol, _ = policy_gradient(model, reference, r, adv, lsp, pad_id=tok.pad_token_id, batch_size=2,
                             accelerator=accelerator)
    assert sol["kl"] != 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_reference_is_unchanged_by_a_step(tok, accelerator, lora):
    lsp = small_lsp()
    model = tiny_model(tok)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        reference = Reference(peft_policy=model)
    else:
        reference = Reference(copy=tiny_model(tok))
    before = state_hash(reference.frozen_state())
    policy_before = state_hash({k: v for k, v in model.state_dict().items()})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        r = sample_rollouts(model, tok, lsp, seed=0, step=step, batch_size=8)
        adv = lsp_advantages(torch.arange(6, dtype=torch.float64).view(3, 2) % 3)
        policy_gradient(model, reference, r, adv, lsp, pad_id=tok.pad_token_id, batch_size=4, accelerator=accelerator)
        optimizer.step()
        optimizer.zero_grad()
    assert state_hash(model.state_dict()) != policy_before  # the policy moved
    assert state_hash(reference.frozen_state()) == before  # π_Ref did not


# ---------------------------------------------------------------- the update


def fixed_rollouts(tok, model, queries, g, seed=0) -> Rollouts:
    """A fixed query source: given queries, G answers each sampled from the model."""
    lsp = small_lsp(num_queries=len(queries), answers_per_query=g)
    sampled = sample_rollouts(model, tok, lsp, seed=seed, step=1, batch_size=16)
    prompts = [encode(tok, user_turn(q))[0] for q in queries]
    from sparring.generation import HFGenerator, SamplingParams

    outs = HFGenerator(model, tok).generate([p for p in prompts for _ in range(g)], SamplingParams(max_new_tokens=6), 7)
    eos = tok.eos_token_id
    return Rollouts(sampled.challenger_prompt_ids, sampled.query_ids, list(queries), prompts,
                    [o.token_ids + ([eos] if o.finished else []) for o in outs], [o.text for o in outs],
                    [o.finished for o in outs])


def hand_grpo_gradient(model, ref, prompts, answers, rewards, beta):
    """GRPO without std scaling, one unpadded sequence at a time: mean_ij[−A_ij·log π(a|q) + β·Σ_t k3_t]."""
    n, g = rewards.shape
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    model.zero_grad()
    for k, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([p + a])
        picked = slice(len(p) - 1, len(p) + len(a) - 1)  # logits at t predict token t+1
        logp = torch.log_softmax(model(input_ids=ids).logits[0, picked].double(), -1)
        logp = logp.gather(1, torch.tensor(a).view(-1, 1)).squeeze(1)
        with torch.no_grad():
            ref_lp = torch.log_softmax(ref(input_ids=ids).logits[0, picked].double(), -1)
            ref_lp = ref_lp.gather(1, torch.tensor(a).view(-1, 1)).squeeze(1)
        d = ref_lp - logp
        k3 = (torch.exp(d) - d - 1).sum()
        loss = (-adv.view(-1)[k] * logp.sum() + beta * k3) / (n * g)
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_solver_update_is_grpo_without_std_scaling_when_challenger_off(tok, accelerator):
    model, ref = tiny_model(tok, seed=1), tiny_model(tok, seed=1)
    with torch.no_grad():  # θ ≠ θ_Ref, so the KL term has a gradient too
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    queries = ["What is 3 + 4?", "Sort the digits 3 1 2.", "Reverse the word cat."]
    r = fixed_rollouts(tok, model, queries, g=3)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    adv = lsp_advantages(rewards)
    lsp = small_lsp(num_queries=3, answers_per_query=3, challenger_coef=0.0, kl_coef=0.3)
    model.zero_grad()
    policy_gradient(model, Reference(copy=ref), r, adv, lsp, pad_id=tok.pad_token_id, batch_size=2,
                    accelerator=accelerator)
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    prompts = [q for q, _ in r.solver_sequences()]
    expected = hand_grpo_gradient(model, ref, prompts, r.answer_ids, rewards, beta=0.3)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # std scaling (GRPO/TRL default) would give another gradient, and so would the challenger term
    scaled = hand_grpo_gradient(model, ref, prompts, r.answer_ids, rewards / rewards.std(1, keepdim=True), beta=0.3)
    assert not torch.allclose(ours["model.embed_tokens.weight"], scaled["model.embed_tokens.weight"], atol=1e-6)
    model.zero_grad()
    policy_gradient(model, Reference(copy=ref), r, adv, small_lsp(num_queries=3, answers_per_query=3, kl_coef=0.3),
                    pad_id=tok.pad_token_id, batch_size=2, accelerator=accelerator)
    assert not torch.allclose(model.model.embed_tokens.weight.grad, ours["model.embed_tokens.weight"], atol=1e-6)


def test_micro_batched_gradient_equals_lsp_loss_on_the_whole_batch(tok, accelerator):
    from sparring.logprobs import collate, token_logps
    from sparring.losses import kl_k3

    model, ref = tiny_model(tok, seed=2), tiny_model(tok, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lsp = small_lsp(challenger_coef=0.7, kl_coef=0.1)
    r = sample_rollouts(model, tok, lsp, seed=3, step=1, batch_size=8)
    adv = lsp_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 5.0], [0.0, 7.0], [1.0, 1.0]]))
    model.zero_grad()
    sol, ch = policy_gradient(model, Reference(copy=ref), r, adv, lsp, pad_id=tok.pad_token_id, batch_size=1,
                              accelerator=accelerator)
    ours = [p.grad.clone() for p in model.parameters()]

    def role(seqs):
        b = collate(seqs, tok.pad_token_id)
        tok_lp = token_logps(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids, b.response_mask)
        with torch.no_grad():
            ref_lp = token_logps(ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids, b.response_mask)
        return tok_lp.sum(-1), kl_k3(tok_lp, ref_lp, b.response_mask[:, 1:])

    model.zero_grad()
    sol_lp, sol_kl = role(r.solver_sequences())
    ch_lp, ch_kl = role(r.challenger_sequences())
    whole = lsp_loss(sol_lp, adv.solver, ch_lp, adv.challenger, challenger_coef=0.7, kl_coef=0.1,
                     solver_kl=sol_kl, challenger_kl=ch_kl)
    whole.loss.backward()
    assert sol["loss"] == pytest.approx(whole.metrics["lsp/solver_loss"].item(), rel=1e-5, abs=1e-6)
    assert ch["loss"] == pytest.approx(whole.metrics["lsp/challenger_loss"].item(), rel=1e-5, abs=1e-6)
    assert sol["kl"] == pytest.approx(whole.metrics["lsp/kl_solver"].item(), rel=1e-5) and sol["kl"] > 0
    for mine, theirs in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_reward_model_kind_scores_rollouts(tok, tmp_path):
    """A tiny sequence-classification reward model built and saved locally, chosen by config."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from sparring.lsp_rollouts import make_reward

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=256,
    ))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    lsp = small_lsp()
    lsp.reward.kind, lsp.reward.reward_model = "reward_model", str(tmp_path / "rm")
    reward_fn = make_reward(lsp, device="cpu", dtype=torch.float32)
    r = sample_rollouts(tiny_model(tok), tok, lsp, seed=0, step=1, batch_size=8)
    rewards, batch = score_rewards(reward_fn, r, invalid_reward=9.0)
    assert rewards.shape == (3, 2) and all(batch.valid) and rewards.std() > 0
    assert isinstance(batch, RewardBatch)
