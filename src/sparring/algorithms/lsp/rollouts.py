"""LSP's pieces around the loop: rollouts, rewards, the reference and the update.

Kuba et al. 2025 (arXiv 2509.07414). ``algorithms/lsp/__init__.py`` calls these in order; each is small
enough to test on its own (tests/unit/test_lsp_loop.py). The prompts are in ``prompts.py``.

On several processes (``accelerator``): generation, rewards and the self-judge are cut into fixed
batches of ``generation.batch_size``, batch k is done by process k mod world with a seed fixed by k,
and the results are gathered (``sharded``), so every process holds the whole step, as one process
would; the update's micro-batches are split across processes (``backward_role``).
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
from sparring.evaluation.heldout import batches_of
from sparring.generation import HFGenerator, SamplingParams, batch_seed
from sparring.logprobs import collate, forward_logits, token_logps
from sparring.losses.lsp import kl_k3, reinforce_loss
from sparring.rewards import RewardBatch, RewardFn
from sparring.training.loop import gradient_sync, shard_step


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


def sharded(count: int, run: Callable[[int], list], accelerator=None) -> list:
    """run(0) + run(1) + … + run(count − 1) on every process: each process runs the batches
    k ≡ rank (mod world), then the results are gathered in batch order (a collective)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    done = [(k, run(k)) for k in range(rank, count, world)]
    if world > 1:
        from accelerate.utils import gather_object

        done = gather_object(done)
    return [item for _, out in sorted(done, key=lambda kv: kv[0]) for item in out]


def _sample(model, tokenizer, prompts, params: SamplingParams, seed: int, batch_size: int, accelerator=None):
    """One completion per prompt, in order: fixed batches, batch k seeded by (seed, k), shared out."""
    generator = HFGenerator(model, tokenizer)
    batches = batches_of(list(range(len(prompts))), batch_size)
    return sharded(len(batches), lambda k: generator.generate([prompts[i] for i in batches[k]], params,
                                                              batch_seed(seed, k)), accelerator)


def sample_rollouts(model, tokenizer, lsp: LspConfig, *, seed: int, step: int, batch_size: int,
                    prompts: list[list[dict]] | None = None, accelerator=None) -> Rollouts:
    """Challenger (or data prompts) then solver sampling, seeded by (seed, step, role) so a resumed
    run redraws them; with an ``accelerator`` the batches are shared out (``sharded``).

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
        queries = _sample(model, tokenizer, per_query, query_params, batch_seed(seed, "lsp", step, "challenger"), batch_size,
                          accelerator)
        texts, query_ids, finished = [q.text for q in queries], [q.token_ids for q in queries], [q.finished for q in queries]
        solver_prompts = [encode(tokenizer, user_turn(t))[0] for t in texts]
        per_query = per_query if lsp.difficulties else None
    g = lsp.answers_per_query
    answer_params = SamplingParams(temperature=lsp.temperature, max_new_tokens=lsp.answer_max_new_tokens)
    answers = _sample(model, tokenizer, [p for p in solver_prompts for _ in range(g)], answer_params,
                      batch_seed(seed, "lsp", step, "solver"), batch_size, accelerator)
    return Rollouts(
        cp_ids, query_ids, texts, solver_prompts,
        [a.token_ids for a in answers], [a.text for a in answers], [a.finished for a in answers],
        finished, per_query,
    )


def make_reward(lsp: LspConfig, *, device, dtype) -> RewardFn:
    """The task reward R(q, a) chosen by ``lsp.reward.kind``."""
    kind = lsp.reward.kind
    if kind == "verifier":  # a verifier of the registry, as held-out evaluation's eval.verifier
        from sparring.rewards.registry import verifier

        return verifier(lsp.reward.verifier).reward
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


def score_rewards(reward_fn: RewardFn, r: Rollouts, cfg: LspRewardConfig, on_truncated: str = "keep", *,
                  batch_size: int | None = None, accelerator=None) -> RolloutRewards:
    """R as an (N, G) float64 tensor (the pairs judged in batches of ``batch_size``, shared out
    across processes by ``sharded``; None: in one call), with the pairs the reward could not judge (``valid=False``, e.g. a
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
    batch = judge_pairs(reward_fn, [q for q in r.queries for _ in range(g)], r.answers, batch_size, accelerator)
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


def judge_pairs(reward_fn: RewardFn, queries: list[str], answers: list[str], batch_size: int | None,
                accelerator=None) -> RewardBatch:
    """``reward_fn`` over the pairs in fixed batches (batch k by process k mod world), gathered in order."""
    if batch_size is None:
        return reward_fn(queries, answers)

    def run(k: int) -> list[tuple[float, bool]]:
        out = reward_fn(queries[k * batch_size : (k + 1) * batch_size], answers[k * batch_size : (k + 1) * batch_size])
        return list(zip(out.scores, out.valid))

    pairs = sharded(-(-len(queries) // batch_size), run, accelerator)
    return RewardBatch([score for score, _ in pairs], [ok for _, ok in pairs])


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


def judge_generate(reference: Reference, tokenizer, lsp: LspConfig, batch_size: int,
                   accelerator=None) -> Callable[[list[str]], list[str]]:
    """SelfJudge's ``generate``: π_Ref answers each grading prompt (a user turn), greedily; with an
    ``accelerator`` the batches are shared out across processes (``sharded``)."""
    params = SamplingParams.greedy(lsp.judge_max_new_tokens)

    def generate(prompts: list[str]) -> list[str]:
        ids = [encode(tokenizer, user_turn(p))[0] for p in prompts]
        with reference.model() as ref:
            return [c.text for c in _sample(ref, tokenizer, ids, params, 0, batch_size, accelerator)]

    return generate


def backward_role(
    model, reference: Reference, seqs, advantages: torch.Tensor, *, weight: float, lsp: LspConfig,
    pad_id: int, batch_size: int, accelerator, keep: torch.Tensor | None = None, loss_scale: int = 1,
    last: bool = True,
) -> dict[str, Any]:
    """Accumulate ∇ of weight · Σ_b keep_b · loss_b (REINFORCE + KL, ``reinforce_loss``) in micro-batches.

    ``weight`` is 1/(N·G) for the solver and α_Ch/N for the challenger, so the accumulated gradient
    is that of ``lsp_loss`` on the whole batch; ``keep`` (one bool per sequence, None: all) zeroes the
    sequences left out of training, under the same normaliser. Returns the role's mean KL, log-prob
    and loss (L_Sol or L_Ch, without α_Ch) over this process's ``rows``, its ``tokens``, and under
    ``nonfinite`` the positions in ``seqs`` whose loss was NaN/inf (kept or not: 0 × NaN still poisons
    the gradient). Log-probs are those of softmax(logits / lsp.temperature), the distribution the
    rollouts were sampled from. π_Ref's per-token log-probs are taken on the same padded batch, so at
    θ = θ_Ref every KL term is exactly zero.

    On several processes each micro-batch of batch_size × world sequences is split across them
    (``training.loop.shard_step``: every process runs as many, a stand-in of weight 0 where it has no
    rows); the loss is multiplied by ``loss_scale`` (the engine's, undoing DDP's mean over processes),
    and gradients are all-reduced only in the last backward of the step (``last``: this role's is it).
    """
    device = accelerator.device
    keep = torch.ones(len(seqs), dtype=torch.bool) if keep is None else keep.reshape(-1)
    plan = batches_of(list(range(len(seqs))), batch_size * accelerator.num_processes)
    micro_batches = shard_step(plan, accelerator.process_index, accelerator.num_processes)
    sums = {"kl": 0.0, "logps": 0.0, "loss": 0.0}
    bad: list[int] = []
    rows = tokens = 0
    for j, micro in enumerate(micro_batches):
        idx, scale = micro.indices, loss_scale if micro.count else 0
        batch = collate([seqs[i] for i in idx], pad_id)
        batch = type(batch)(*(t.to(device) for t in batch))
        mask = batch.response_mask[:, 1:]  # (B, T−1)
        with gradient_sync(accelerator, model, last=last and j == len(micro_batches) - 1), accelerator.autocast():
            with torch.no_grad(), reference.model() as ref:
                ref_tok = _role_token_logps(ref, batch, lsp.temperature)  # (B, T−1)
            tok = _role_token_logps(model, batch, lsp.temperature)  # (B, T−1)
            out = reinforce_loss(
                tok.sum(-1), advantages[idx].to(device),
                kl_coef=lsp.kl_coef, kl_estimator=lsp.kl_estimator,
                kl_k3_per_seq=kl_k3(tok, ref_tok, mask) if lsp.kl_estimator == "k3" else None,
                seq_logps_ref=ref_tok.sum(-1),
            )
            kept = keep[idx].to(device, out.loss.dtype)  # (B,)
            accelerator.backward((out.loss * kept).sum() * (weight * scale))
        # A stand-in's NaN counts too: 0 × NaN is still NaN in the gradients it sends.
        bad += [i for i, ok in zip(idx, torch.isfinite(out.loss.detach()).tolist()) if not ok]
        if micro.count:
            n = len(idx)
            rows, tokens = rows + n, tokens + sum(len(p) + len(c) for p, c in (seqs[i] for i in idx))
            sums["kl"] += out.metrics["kl"].item() * n
            sums["logps"] += out.metrics["logps"].item() * n
            sums["loss"] += (out.loss.detach() * kept).sum().item()
    means = {key: value / max(rows, 1) for key, value in sums.items()}  # over this process's sequences of the role
    return {**means, "nonfinite": bad, "rows": rows, "tokens": tokens}


def _role_token_logps(model, batch, temperature: float) -> torch.Tensor:  # (B, T−1)
    return token_logps(forward_logits(model, batch), batch.input_ids, batch.response_mask, temperature=temperature)


def policy_gradient(
    model, reference: Reference, r: Rollouts, adv, lsp: LspConfig, *, pad_id: int, batch_size: int, accelerator,
    solver_keep: torch.Tensor | None = None, loss_scale: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Accumulate ∇(L_Sol + α_Ch·L_Ch) of eqs. 4–5; with α_Ch = 0 the challenger term is left out.

    ``solver_keep`` (N, G) bool, False on the answers that get no gradient (``RolloutRewards.keep``); None: all train.
    ``loss_scale``: the step engine's (``Engine.loss_scale``); None: the number of processes. Each
    process returns its own rows' metrics (``role_sums`` and ``reduced_roles`` make them global).
    """
    # The update phase: training mode whatever rollouts or evaluation left (gradient checkpointing
    # is only active in training mode).
    model.train()
    n, g = adv.solver.shape
    scale = accelerator.num_processes if loss_scale is None else loss_scale
    common = dict(lsp=lsp, pad_id=pad_id, batch_size=batch_size, accelerator=accelerator, loss_scale=scale)
    sol = backward_role(model, reference, r.solver_sequences(), adv.solver.reshape(-1), weight=1 / (n * g),
                        keep=solver_keep, last=not lsp.challenger_coef, **common)
    if not lsp.challenger_coef:
        return sol, None
    ch = backward_role(model, reference, r.challenger_sequences(), adv.challenger, weight=lsp.challenger_coef / n, **common)
    return sol, ch


ROLE_METRICS = ("kl", "logps", "loss")


def role_sums(sol: dict[str, Any], ch: dict[str, Any] | None) -> tuple[dict[str, float], dict[str, float]]:
    """The roles' metrics as the step engine's sums and shares (``Work``): its all-reduce turns them
    into means over every process's rows (``reduced_roles`` reads them back)."""
    sums, shares = {}, {}
    for role, out in (("solver", sol), ("challenger", ch)):
        for key in ROLE_METRICS if out is not None else ():
            sums[f"{role}/{key}"], shares[f"{role}/{key}"] = out[key] * out["rows"], float(out["rows"])
    return sums, shares


def reduced_roles(metrics: dict[str, float], sol: dict[str, Any], ch: dict[str, Any] | None):
    """``sol`` and ``ch`` with the means over every process (the engine's reduced ``role_sums``)."""
    def of(role: str, out: dict[str, Any] | None):
        return None if out is None else {**out, **{key: metrics[f"{role}/{key}"] for key in ROLE_METRICS}}

    return of("solver", sol), of("challenger", ch)


def gather_nonfinite(accelerator, sol: dict[str, Any], ch: dict[str, Any] | None):
    """``sol`` and ``ch`` with the non-finite positions of every process (a collective: every process
    calls it, on the same step)."""
    if accelerator.num_processes == 1:
        return sol, ch
    from accelerate.utils import gather_object

    def of(out: dict[str, Any] | None):
        return None if out is None else {**out, "nonfinite": sorted(set(gather_object(out["nonfinite"])))}

    return of(sol), of(ch)


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
