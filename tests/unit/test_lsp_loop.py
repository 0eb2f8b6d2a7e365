"""LSP's loop pieces on real (tiny, random) model rollouts: config checks, the verifier, conditioning of
the two roles, KL = 0 at θ = θ_Ref, the frozen reference, and the α_Ch = 0 reduction to GRPO."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tests.conftest import small_model

from sparring.algorithms.lsp.prompts import CHALLENGER_PROMPT, challenger_prompt, user_turn
from sparring.algorithms.lsp.rollouts import Reference, Rollouts, policy_gradient, sample_rollouts, score_rewards
from sparring.config import ConfigError, LspConfig, LspRewardConfig, load_config
from sparring.data import encode
from sparring.losses import lsp_advantages, lsp_loss
from sparring.rewards import ProvingGroundVerifier, RewardBatch, UserReward

TINY = "configs/lsp/tiny.yaml"


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
    with pytest.raises(ConfigError, match="'nope' is not a registered verifier; verifiers: proving_ground"):
        load_config(TINY, ["lsp.reward.verifier=nope"])


def test_the_verifier_reward_is_the_one_the_registry_names():
    from sparring.algorithms.lsp.rollouts import make_reward
    from sparring.rewards import registry
    from sparring.rewards.base import RewardBatch

    class Length:
        def __call__(self, queries, answers):
            return RewardBatch([float(len(a)) for a in answers], [True] * len(answers))

    registry.register("length", Length)
    try:
        cfg = load_config(TINY, ["lsp.reward.verifier=length"])
        assert make_reward(cfg.lsp, device="cpu", dtype=None)(["q", "q"], ["ab", "abc"]).scores == [2.0, 3.0]
    finally:
        registry.unregister("length")
    default = make_reward(load_config(TINY).lsp, device="cpu", dtype=None)
    assert isinstance(default, ProvingGroundVerifier)


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
    scored = score_rewards(ProvingGroundVerifier(), r, LspRewardConfig(invalid_query_reward=0.25))
    assert scored.rewards.tolist() == [[1.0, 0.0], [0.25, 0.25]]
    assert scored.batch.valid == [True, True, False, False] and scored.invalid.tolist() == [False, True]


def judge_by_table(query: str, answer: str) -> float | None:
    """A user reward: None for every answer of the query "bad", and for answers it does not know."""
    if query == "bad":
        return None
    return {"right": 1.0, "half": 0.5, "wrong": 0.0}.get(answer)


def test_an_unjudgeable_answer_gets_the_lowest_reward_and_an_all_none_query_is_invalid():
    r = Rollouts([1], [[2], [3]], ["good", "bad"], [[1], [1]], [[4]] * 6,
                 ["right", "??", "half", "right", "wrong", "half"], [True] * 6)
    scored = score_rewards(UserReward(judge_by_table), r, LspRewardConfig(invalid_query_reward=1.0))
    # "??" was not judged beside judged answers: the lowest reward, never invalid_query_reward (the top)
    assert scored.rewards.tolist() == [[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]
    assert scored.invalid.tolist() == [False, True]  # every answer None: the query is invalid
    adv = lsp_advantages(scored.rewards)
    assert adv.solver[0, 1] < 0 < adv.solver[0, 0] and adv.solver[1].abs().max() == 0
    # the lowest reward is a setting, for user rewards whose range is not [0, 1]
    low = score_rewards(UserReward(judge_by_table), r, LspRewardConfig(unjudged_answer_reward=-3.0))
    assert low.rewards[0].tolist() == [1.0, -3.0, 0.5]


def truncated_rollouts() -> Rollouts:
    """Query 0: its 2nd answer truncated; query 1: the query itself truncated; query 2: every answer truncated."""
    queries = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
    answers = ["2", "2", "3", "4", "4", "4", "6", "6", "6"]
    finished = [True, False, True, True, True, True, False, False, False]
    return Rollouts([1], [[2]] * 3, queries, [[1]] * 3, [[4]] * 9, answers, finished, [True, False, True])


@pytest.mark.parametrize("mode", ["keep", "drop", "penalize"])
def test_truncated_answers_and_queries_follow_on_truncated(mode):
    cfg = LspRewardConfig(invalid_query_reward=0.25, truncated_reward=-0.5)
    scored = score_rewards(ProvingGroundVerifier(), truncated_rollouts(), cfg, on_truncated=mode)
    t, f = True, False
    expected = {
        "keep": ([[1, 1, 0], [1, 1, 1], [1, 1, 1]], [[t, t, t]] * 3, [f, f, f]),
        # a truncated query is an invalid query; a truncated answer gets truncated_reward
        "penalize": ([[1, -0.5, 0], [0.25] * 3, [-0.5] * 3], [[t, t, t]] * 3, [f, t, f]),
        # a truncated answer gets no gradient; a query left with no finished answer is invalid
        "drop": ([[1, 1, 0], [0.25] * 3, [0.25] * 3], [[t, f, t], [t, t, t], [f, f, f]], [f, t, t]),
    }[mode]
    assert scored.rewards.tolist() == expected[0]
    assert scored.keep.tolist() == expected[1]
    assert scored.invalid.tolist() == expected[2]


def test_dropped_answers_leave_the_group_baseline():
    scored = score_rewards(ProvingGroundVerifier(), truncated_rollouts(), LspRewardConfig(invalid_query_reward=0.25),
                           on_truncated="drop")
    adv = lsp_advantages(scored.rewards, keep=scored.keep)
    # query 0: baseline over its finished answers (1 and 0), the dropped answer's advantage is 0
    assert adv.solver.tolist() == [[0.5, 0.0, -0.5], [0.0] * 3, [0.0] * 3]
    assert adv.query_value.tolist() == [0.5, 0.25, 0.25]


def test_step_metrics_count_truncated_answers_and_queries():
    from sparring.algorithms.lsp import step_metrics

    r = truncated_rollouts()
    scored = score_rewards(ProvingGroundVerifier(), r, LspRewardConfig(), on_truncated="drop")
    adv = lsp_advantages(scored.rewards, keep=scored.keep)
    sol = {"kl": 0.0, "logps": -1.0, "loss": 0.0}
    row = step_metrics(r, scored, adv, None, 0, sol, None)
    assert row["lsp/answer_truncated_frac"] == pytest.approx(4 / 9)
    assert row["lsp/query_truncated_frac"] == pytest.approx(1 / 3)
    assert row["lsp/invalid_query_frac"] == pytest.approx(2 / 3)
    assert "lsp/answer_clipped_frac" not in row  # one name for one count


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
    r = sample_rollouts(small_model(tok), tok, lsp, seed=1, step=3, batch_size=4)
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
    again = sample_rollouts(small_model(tok), tok, lsp, seed=1, step=3, batch_size=4)
    assert again.query_ids == r.query_ids and again.answer_ids == r.answer_ids
    other = sample_rollouts(small_model(tok), tok, lsp, seed=1, step=4, batch_size=4)
    assert other.query_ids != r.query_ids


@pytest.mark.parametrize("estimator", ["k3", "reward"])
def test_kl_is_exactly_zero_at_initialisation(tok, accelerator, estimator):
    lsp = small_lsp(kl_estimator=estimator)
    model = small_model(tok)
    reference = Reference(copy=small_model(tok))
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
    model = small_model(tok)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        reference = Reference(peft_policy=model)
    else:
        reference = Reference(copy=small_model(tok))
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
    return Rollouts(sampled.challenger_prompt_ids, sampled.query_ids, list(queries), prompts,
                    [o.token_ids for o in outs], [o.text for o in outs], [o.finished for o in outs])


def hand_grpo_gradient(model, ref, prompts, answers, rewards, beta, keep=None):
    """GRPO without std scaling, one unpadded sequence at a time: mean_ij[−A_ij·log π(a|q) + β·Σ_t k3_t].

    ``keep`` (N, G): answers left out of the baseline and of the sum (the normaliser stays 1/(NG)).
    """
    n, g = rewards.shape
    keep = torch.ones(n, g, dtype=torch.bool) if keep is None else keep
    adv = rewards - (rewards * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    model.zero_grad()
    for k, (p, a) in enumerate(zip(prompts, answers)):
        if not keep.view(-1)[k]:
            continue
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
    model, ref = small_model(tok, seed=1), small_model(tok, seed=1)
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


def test_dropped_answers_get_no_gradient(tok, accelerator):
    model, ref = small_model(tok, seed=1), small_model(tok, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    r = fixed_rollouts(tok, model, ["What is 3 + 4?", "Sort the digits 3 1 2.", "Reverse the word cat."], g=3)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])
    lsp = small_lsp(num_queries=3, answers_per_query=3, challenger_coef=0.0, kl_coef=0.3)
    model.zero_grad()
    policy_gradient(model, Reference(copy=ref), r, lsp_advantages(rewards, keep=keep), lsp, pad_id=tok.pad_token_id,
                    batch_size=2, accelerator=accelerator, solver_keep=keep)
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected = hand_grpo_gradient(model, ref, [q for q, _ in r.solver_sequences()], r.answer_ids, rewards,
                                  beta=0.3, keep=keep)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def hand_token_logps(model, seqs, temperature: float) -> list[torch.Tensor]:
    """log softmax(logits / T) of each sampled token, one unpadded sequence at a time."""
    out = []
    for p, a in seqs:
        ids = torch.tensor([p + a])
        picked = slice(len(p) - 1, len(p) + len(a) - 1)  # logits at t predict token t+1
        logp = torch.log_softmax(model(input_ids=ids).logits[0, picked].double() / temperature, -1)
        out.append(logp.gather(1, torch.tensor(a).view(-1, 1)).squeeze(1))  # (len(a),)
    return out


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_logps_and_kl_are_those_of_the_sampling_temperature(tok, accelerator, temperature):
    model, ref = small_model(tok, seed=4), small_model(tok, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lsp = small_lsp(temperature=temperature, kl_coef=0.1)
    r = sample_rollouts(model, tok, lsp, seed=0, step=1, batch_size=8)
    adv = lsp_advantages(torch.rand(3, 2, dtype=torch.float64))
    sol, ch = policy_gradient(model, Reference(copy=ref), r, adv, lsp, pad_id=tok.pad_token_id, batch_size=2,
                              accelerator=accelerator)
    with torch.no_grad():
        for got, seqs in ((sol, r.solver_sequences()), (ch, r.challenger_sequences())):
            policy = hand_token_logps(model, seqs, temperature)
            frozen = hand_token_logps(ref, seqs, temperature)
            k3 = [(torch.exp(b - a) - (b - a) - 1).sum() for a, b in zip(policy, frozen)]
            assert got["logps"] == pytest.approx(sum(lp.sum().item() for lp in policy) / len(seqs), rel=1e-5)
            assert got["kl"] == pytest.approx(sum(k.item() for k in k3) / len(seqs), rel=1e-4, abs=1e-8)


def test_rollouts_run_in_eval_mode_and_the_update_in_training_mode(tok, accelerator):
    model = small_model(tok).train()
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append((m.training, torch.is_grad_enabled())))
    r = sample_rollouts(model, tok, small_lsp(), seed=0, step=1, batch_size=8)
    assert modes and not any(training for training, _ in modes)
    model.eval()  # as from_pretrained and the held-out evaluation leave it
    modes.clear()
    policy_gradient(model, Reference(copy=small_model(tok)), r, lsp_advantages(torch.rand(3, 2)), small_lsp(),
                    pad_id=tok.pad_token_id, batch_size=4, accelerator=accelerator)
    assert modes == [(True, True)] * 3  # 2 solver and 1 challenger micro-batches, gradient checkpointing live


def test_evaluation_leaves_the_policy_in_training_mode(tok, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from sparring import stages
    from sparring.algorithms import lsp as lsp_algorithm
    from sparring.config import RunConfig
    from sparring.state import RunDir

    def evaluate_stage(s, label, model=None):  # as the held-out evaluation does
        model.eval()

    monkeypatch.setattr(stages, "evaluate_stage", evaluate_stage)
    model = small_model(tok).train()
    lsp_algorithm.evaluate(SimpleNamespace(cfg=RunConfig(), main=True, run_dir=RunDir(tmp_path)), model, 0)
    assert model.training


def test_micro_batched_gradient_equals_lsp_loss_on_the_whole_batch(tok, accelerator):
    from sparring.logprobs import collate, forward_logits, token_logps
    from sparring.losses import kl_k3

    model, ref = small_model(tok, seed=2), small_model(tok, seed=2)
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
        tok_lp = token_logps(forward_logits(model, b), b.input_ids, b.response_mask)
        with torch.no_grad():
            ref_lp = token_logps(forward_logits(ref, b), b.input_ids, b.response_mask)
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

    from sparring.algorithms.lsp.rollouts import make_reward

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
    r = sample_rollouts(small_model(tok), tok, lsp, seed=0, step=1, batch_size=8)
    scored = score_rewards(reward_fn, r, LspRewardConfig(invalid_query_reward=9.0))
    assert scored.rewards.shape == (3, 2) and all(scored.batch.valid) and scored.rewards.std() > 0
    assert isinstance(scored.batch, RewardBatch)
