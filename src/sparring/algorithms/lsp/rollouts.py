"""LSP's pieces around the loop: rollouts, rewards, the reference and the update.

Kuba et al. 2025 (arXiv 2509.07414). ``algorithms/lsp/__init__.py`` calls these in order; each is small
enough to test on its own (tests/unit/test_lsp_loop.py). The prompts are in ``prompts.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from sparring.algorithms.lsp.prompts import challenger_prompt, prompt_indices, query_difficulties, user_turn
from sparring.config import LspConfig, LspRewardConfig
from sparring.data import encode
from sparring.generation import HFGenerator, SamplingParams, batch_seed
from sparring.logprobs import collate, forward_logits, token_logps
from sparring.losses.lsp import kl_k3, reinforce_loss
from sparring.rewards import RewardBatch, RewardFn


@dataclass
class Rollouts:
    """One iteration's playouts: N queries from π_θ(·|⟨cp⟩), G answers each from π_θ(·|q)."""

    challenger_prompt_ids: list[int]  # ⟨cp⟩ rendered as a user turn
    query_ids: list[list[int]]  # N sampled query tokens (closed by the stop id when the query finished)
    queries: list[str]  # N decoded q_i
    solver_prompt_ids: list[list[int]]  # N: q_i rendered as a user turn, without ⟨cp⟩
    answer_ids: list[list[int]]  # N·G row-major: (i=0, j=0), (i=0, j=1), …
    answers: list[str]  # N·G
    answers_finished: list[bool]  # N·G, False: cut at lsp.answer_max_new_tokens
    queries_finished: list[bool] | None = None  # N, False: cut at lsp.query_max_new_tokens; None: all finished
    # N per-query ⟨cp⟩ ids (lsp.difficulties fills each query's prompt); None: challenger_prompt_ids for all
    challenger_prompts: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.queries_finished is None:
            self.queries_finished = [True] * len(self.queries)

    @property
    def group_size(self) -> int:
        return len(self.answers) // len(self.queries)

    def challenger_sequences(self) -> list[tuple[list[int], list[int]]]:
        """(⟨cp⟩ prompt, q_i): the challenger is scored on its query, conditioned on (its own) ⟨cp⟩."""
        prompts = self.challenger_prompts or [self.challenger_prompt_ids] * len(self.query_ids)
        return list(zip(prompts, self.query_ids))

    def solver_sequences(self) -> list[tuple[list[int], list[int]]]:
        """(q_i prompt, a_i^j): the solver is scored on its answer, conditioned on q_i alone."""
        g = self.group_size
        return [(self.solver_prompt_ids[k // g], a) for k, a in enumerate(self.answer_ids)]


def _sample(model, tokenizer, prompts, params: SamplingParams, seed: int, batch_size: int):
    generator = HFGenerator(model, tokenizer)
    out = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        out += generator.generate(prompts[start : start + batch_size], params, batch_seed(seed, k))
    return out


def sample_rollouts(model, tokenizer, lsp: LspConfig, *, seed: int, step: int, batch_size: int,
                    prompts: list[list[dict]] | None = None) -> Rollouts:
    """Challenger (or data prompts) then solver sampling, seeded by (seed, step, role) so a resumed
    run redraws them.

    ``lsp.query_source=data``: the N queries are ``prompts[prompt_indices(...)]`` (``load_prompts``),
    each rendered as it is (system turn included); q_i, for the reward, is its last user turn."""
    model.eval()  # the rollout phase; policy_gradient puts the model back in training mode
    if lsp.query_source == "data":
        if not prompts:
            raise ValueError("lsp.query_source=data needs the prompts (load_prompts(lsp.prompts))")
        chosen = [prompts[i] for i in prompt_indices(len(prompts), lsp.num_queries, seed=seed, step=step)]
        texts = [p[-1]["content"] for p in chosen]
        solver_prompts = [encode(tokenizer, p)[0] for p in chosen]
        # No challenger: the query ids are the query text's tokens (for the length metric only).
        cp_ids, query_ids, finished, per_query = [], [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], [True] * len(texts), None
    else:
        per_query = [encode(tokenizer, user_turn(challenger_prompt(lsp, d)))[0] for d in query_difficulties(lsp)]
        cp_ids = per_query[0]
        query_params = SamplingParams(temperature=lsp.temperature, max_new_tokens=lsp.query_max_new_tokens)
        queries = _sample(model, tokenizer, per_query, query_params, batch_seed(seed, "lsp", step, "challenger"), batch_size)
        texts, query_ids, finished = [q.text for q in queries], [q.token_ids for q in queries], [q.finished for q in queries]
        solver_prompts = [encode(tokenizer, user_turn(t))[0] for t in texts]
        per_query = per_query if lsp.difficulties else None
    g = lsp.answers_per_query
    answer_params = SamplingParams(temperature=lsp.temperature, max_new_tokens=lsp.answer_max_new_tokens)
    answers = _sample(model, tokenizer, [p for p in solver_prompts for _ in range(g)], answer_params,
                      batch_seed(seed, "lsp", step, "solver"), batch_size)
    return Rollouts(
        cp_ids, query_ids, texts, solver_prompts,
        [a.token_ids for a in answers], [a.text for a in answers], [a.finished for a in answers],
        finished, per_query,
    )


def make_reward(lsp: LspConfig, *, device, dtype) -> RewardFn:
    """The task reward R(q, a) chosen by ``lsp.reward.kind``."""
    kind = lsp.reward.kind
    if kind == "verifier":
        from sparring.rewards import ProvingGroundVerifier

        return ProvingGroundVerifier()
    if kind == "reward_model":
        from sparring.rewards import HFRewardModel

        return HFRewardModel(lsp.reward.reward_model, device=device, dtype=dtype)
    from sparring.rewards import load_user_reward

    return load_user_reward(lsp.reward.function)


class RolloutRewards(NamedTuple):
    """R of one step's rollouts after the invalid-query and truncation rules of ``score_rewards``."""

    rewards: torch.Tensor  # (N, G) float64 R
    keep: torch.Tensor  # (N, G) bool, False: a truncated answer left out of the solver's update (drop)
    invalid: torch.Tensor  # (N,) bool, queries scored as invalid
    batch: RewardBatch  # what the reward function returned


def score_rewards(reward_fn: RewardFn, r: Rollouts, cfg: LspRewardConfig, on_truncated: str = "keep") -> RolloutRewards:
    """R as an (N, G) float64 tensor, with the pairs the reward could not judge (``valid=False``, e.g. a
    user function's None) and truncated rollouts scored by these rules:

    - a query none of whose answers could be judged is invalid: all its answers get
      ``cfg.invalid_query_reward`` (default 1.0), so the solver learns nothing from it (equal rewards)
      and the challenger sees its worst case. An unjudgeable answer beside judged ones gets
      ``cfg.unjudged_answer_reward`` (default 0.0, the lowest reward), never the top one.
    - ``on_truncated`` (``generation.on_truncated``): ``keep`` scores truncated rollouts like the
      others; ``penalize`` gives a truncated answer ``cfg.truncated_reward``; ``drop`` leaves it out
      of the solver's update (``keep`` False: no gradient, and ``lsp_advantages(keep=)`` takes the
      group baseline over the finished answers). With either, a truncated query is an invalid query,
      and with drop so is a query left with no finished answer that could be judged.
    """
    n, g = len(r.queries), r.group_size
    batch = reward_fn([q for q in r.queries for _ in range(g)], r.answers)
    judged = torch.tensor(batch.valid, dtype=torch.bool).view(n, g)
    finished = torch.tensor(r.answers_finished, dtype=torch.bool).view(n, g)
    keep = finished if on_truncated == "drop" else torch.ones_like(finished)
    rewards = torch.tensor(batch.scores, dtype=torch.float64).view(n, g)
    rewards = torch.where(judged, rewards, cfg.unjudged_answer_reward)
    if on_truncated == "penalize":
        rewards = torch.where(finished, rewards, cfg.truncated_reward)
    invalid = ~(judged & keep).any(dim=1)  # (N,)
    if on_truncated != "keep":
        invalid |= ~torch.tensor(r.queries_finished, dtype=torch.bool)
    rewards[invalid] = cfg.invalid_query_reward
    return RolloutRewards(rewards, keep, invalid, batch)


class Reference:
    """π_Ref, the frozen initial model: a second copy, or (LoRA) the policy with its adapters disabled."""

    def __init__(self, copy=None, peft_policy=None):
        if (copy is None) == (peft_policy is None):
            raise ValueError("give either a frozen copy or a PEFT policy")
        self.copy, self.peft_policy = copy, peft_policy
        if copy is not None:
            copy.requires_grad_(False).eval()

    @contextlib.contextmanager
    def model(self):
        if self.copy is not None:
            yield self.copy
            return
        # The policy may be in training mode (the update): π_Ref's no-grad pass runs in eval mode.
        was_training = self.peft_policy.training
        self.peft_policy.eval()
        try:
            with self.peft_policy.disable_adapter():
                yield self.peft_policy
        finally:
            self.peft_policy.train(was_training)

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The weights π_Ref is made of (the base weights under LoRA), for the unchanged-reference check."""
        if self.copy is not None:
            return self.copy.state_dict()
        return {k: v for k, v in self.peft_policy.state_dict().items() if "lora_" not in k}


def judge_generate(reference: Reference, tokenizer, lsp: LspConfig, batch_size: int) -> Callable[[list[str]], list[str]]:
    """SelfJudge's ``generate``: π_Ref answers each grading prompt (a user turn), greedily."""
    params = SamplingParams.greedy(lsp.judge_max_new_tokens)

    def generate(prompts: list[str]) -> list[str]:
        ids = [encode(tokenizer, user_turn(p))[0] for p in prompts]
        with reference.model() as ref:
            return [c.text for c in _sample(ref, tokenizer, ids, params, 0, batch_size)]

    return generate


def backward_role(
    model, reference: Reference, seqs, advantages: torch.Tensor, *, weight: float, lsp: LspConfig,
    pad_id: int, batch_size: int, accelerator, keep: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accumulate ∇ of weight · Σ_b keep_b · loss_b (REINFORCE + KL, ``reinforce_loss``) in micro-batches.

    ``weight`` is 1/(N·G) for the solver and α_Ch/N for the challenger, so the accumulated gradient
    is that of ``lsp_loss`` on the whole batch; ``keep`` (one bool per sequence, None: all) zeroes the
    sequences left out of training, under the same normaliser. Returns the role's mean KL, log-prob
    and loss (L_Sol or L_Ch, without α_Ch), and under ``nonfinite`` the positions in ``seqs`` whose loss
    was NaN/inf (kept or not: 0 × NaN still poisons the gradient). Log-probs are those of
    softmax(logits / lsp.temperature), the distribution the rollouts were sampled from. π_Ref's
    per-token log-probs are taken on the same padded batch, so at θ = θ_Ref every KL term is exactly zero.
    """
    device = accelerator.device
    keep = torch.ones(len(seqs), dtype=torch.bool) if keep is None else keep.reshape(-1)
    sums = {"kl": 0.0, "logps": 0.0, "loss": 0.0}
    bad: list[int] = []
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start : start + batch_size], pad_id)
        batch = type(batch)(*(t.to(device) for t in batch))
        mask = batch.response_mask[:, 1:]  # (B, T−1)
        with accelerator.autocast():
            with torch.no_grad(), reference.model() as ref:
                ref_tok = _role_token_logps(ref, batch, lsp.temperature)  # (B, T−1)
            tok = _role_token_logps(model, batch, lsp.temperature)  # (B, T−1)
            out = reinforce_loss(
                tok.sum(-1), advantages[start : start + batch_size].to(device),
                kl_coef=lsp.kl_coef, kl_estimator=lsp.kl_estimator,
                kl_k3_per_seq=kl_k3(tok, ref_tok, mask) if lsp.kl_estimator == "k3" else None,
                seq_logps_ref=ref_tok.sum(-1),
            )
            kept = keep[start : start + batch_size].to(device, out.loss.dtype)  # (B,)
            accelerator.backward((out.loss * kept).sum() * weight)
        n = len(out.loss)
        bad += [start + b for b, ok in enumerate(torch.isfinite(out.loss.detach()).tolist()) if not ok]
        sums["kl"] += out.metrics["kl"].item() * n
        sums["logps"] += out.metrics["logps"].item() * n
        sums["loss"] += (out.loss.detach() * kept).sum().item()
    means = {key: value / len(seqs) for key, value in sums.items()}  # over the role's sequences
    return {**means, "nonfinite": bad}


def _role_token_logps(model, batch, temperature: float) -> torch.Tensor:  # (B, T−1)
    return token_logps(forward_logits(model, batch), batch.input_ids, batch.response_mask, temperature=temperature)


def policy_gradient(
    model, reference: Reference, r: Rollouts, adv, lsp: LspConfig, *, pad_id: int, batch_size: int, accelerator,
    solver_keep: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Accumulate ∇(L_Sol + α_Ch·L_Ch) of eqs. 4–5; with α_Ch = 0 the challenger term is left out.

    ``solver_keep`` (N, G) bool, False on the answers that get no gradient (``RolloutRewards.keep``); None: all train.
    """
    # The update phase: training mode whatever rollouts or evaluation left (gradient checkpointing
    # is only active in training mode).
    model.train()
    n, g = adv.solver.shape
    common = dict(lsp=lsp, pad_id=pad_id, batch_size=batch_size, accelerator=accelerator)
    sol = backward_role(model, reference, r.solver_sequences(), adv.solver.reshape(-1), weight=1 / (n * g),
                        keep=solver_keep, **common)
    if not lsp.challenger_coef:
        return sol, None
    ch = backward_role(model, reference, r.challenger_sequences(), adv.challenger, weight=lsp.challenger_coef / n, **common)
    return sol, ch


def nonfinite_what(sol: dict[str, Any], ch: dict[str, Any] | None, group_size: int, grad_norm: float,
                   prompt_rows: list[int] | None = None) -> str:
    """What was not finite in an LSP step, for ``training.loop.nonfinite_message``: the role and the
    step's query indices i (0-based; with query_source=data also the ``lsp.prompts`` rows they are).
    ``sol`` and ``ch`` are ``policy_gradient``'s returns; solver sequence k is answer j of query k // G."""
    parts = []
    if sol["nonfinite"]:
        queries = sorted({k // group_size for k in sol["nonfinite"]})
        parts.append(f"a non-finite solver loss on the answers to queries {queries} (answers {sol['nonfinite']}, i·G + j)")
    if ch is not None and ch["nonfinite"]:
        parts.append(f"a non-finite challenger loss on queries {ch['nonfinite']}")
    if not parts:  # the roles' gradients are summed before the norm is taken: no role can be named
        parts.append(f"a non-finite gradient norm ({grad_norm}) of the solver + challenger update on all queries")
    rows = f"; lsp.prompts rows {prompt_rows} in query order" if prompt_rows is not None else ""
    return " and ".join(parts) + f" (query indices i = 0..N−1 of the step{rows})"
