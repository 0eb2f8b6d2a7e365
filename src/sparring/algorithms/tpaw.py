"""TPAW: team-based self-play with dual adaptive weighting (Li et al., ACL 2026, arXiv 2605.09922).

θ_0 is the base model and θ_k (k ≥ 1) the model iteration k−1 saved. For round t = 0 … T−1, with the team
J_t = [θ_t, θ_{t−1}, …] of the min(t + 1, N_max) newest checkpoints (N_max = ``tpaw.max_team_size``):

1. generate: θ_t samples one response y′ per training prompt, D_t = {(x, y, y′)}; the sets D_k of the
   older team members are read back from their iteration folders, never regenerated;
2. rows: D_O = D_t ∪ D_{t−1} ∪ … (one set per team member, newest first);
3. precompute: every team member's L_θj(y) and L_θj(y′) on D_O's rows, once, in inference mode — θ_t
   first (it is the policy's starting point), then each older checkpoint loaded in turn and released,
   so at most the policy and one reference are in memory, and only the policy during training;
4. train: θ ← θ_t, minimise mean Σ_j β_j·ℓ(α_j·P_j(y) − P_j(y′)), P_j(z) = λ[L_θ(z) − L_θj(z)]
   (``tpaw_loss``; α_j = η where P_j(y) ≤ 0, β = softmax_j(−γ·m_j)); column / metric ``player{c}`` is
   θ_{t−c}, so ``player0`` is SPIN's opponent θ_t; plus ``tpaw.nll_coef``·NLL(y) when that extension
   (RPO-style, not the paper's method, off by default) is on;
5. save θ_{t+1}, evaluate it on held-out data, mark the iteration done.

With LoRA (the ``peft:`` section) θ is θ_t plus fresh adapters, merged into θ_{t+1} at step 5.

The paper's open choices are config switches (docs/algorithms.md): ``tpaw.max_team_size``,
``tpaw.every_player_scores_every_row`` (False: D_k's rows only by θ_k), ``tpaw.logprob_reduction``
(per-token mean for policy and references alike) and ``tpaw.detach_player_weights`` (which changes
nothing numerically: β's gradient is identically zero under these formulas, see ``losses/tpaw.py``).

    sparring run configs/tpaw/tiny.yaml tpaw.iterations=3
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import NamedTuple

import torch

from sparring import stages
from sparring.config import RunConfig
from sparring.logprobs import (
    Sequences,
    SharedPrompt,
    collate_responses,
    response_logps,
    response_tokens,
)
from sparring.losses import LossOutput, add_real_nll, tpaw_loss
from sparring.state import atomic_write_json, check_cache_key
from sparring.training import score_sequences
from sparring.training.precompute import logp_cache_key

READS = ("data", "generation", "train", "tpaw", "per_iteration")  # + config.COMMON_FIELDS


class TeamRecord(NamedTuple):
    prompt_ids: list[int]
    real_ids: list[int]  # y
    generated_ids: list[int]  # y′, sampled by the team member of column ``source``
    team_real: list[float]  # (K,) L_θj(y), column 0 = θ_t; NaN where the player does not score the row
    team_generated: list[float]  # (K,) L_θj(y′), same columns
    team_mask: list[bool]  # (K,) which players score this row


class TeamBatch(NamedTuple):
    sequences: Sequences | SharedPrompt  # (2B, T): the B real, then the B generated; or (B, T), prompt shared
    team_real: torch.Tensor  # (B, K)
    team_generated: torch.Tensor  # (B, K)
    team_mask: torch.Tensor  # (B, K) bool


def collate_team(records: list[TeamRecord], pad_id: int, share_prompt: bool = False) -> TeamBatch:
    rows = [(r.prompt_ids, [r.real_ids, r.generated_ids]) for r in records]
    return TeamBatch(
        collate_responses(rows, pad_id, share_prompt=share_prompt),
        torch.tensor([r.team_real for r in records], dtype=torch.float32),
        torch.tensor([r.team_generated for r in records], dtype=torch.float32),
        torch.tensor([r.team_mask for r in records], dtype=torch.bool),
    )


def tpaw_step(model, batch: TeamBatch, *, average: bool, nll_coef: float = 0.0, **loss_kwargs) -> LossOutput:
    """``tpaw_loss`` on one policy forward, plus ``nll_coef``·NLL(y) (``add_real_nll``) when that is on."""
    real, generated = response_logps(model, batch.sequences, 2, average=average)  # (B,) each, one policy forward
    out = tpaw_loss(real, generated, batch.team_real, batch.team_generated, team_mask=batch.team_mask, **loss_kwargs)
    if not nll_coef:
        return out
    tokens = response_tokens(batch.sequences, 2)[:, 0]  # (B,) |y|
    return add_real_nll(out, real * tokens if average else real, tokens, nll_coef)  # NLL needs the sums L_θ(y)


def team(t: int, max_team_size: int) -> list[int]:
    """J_t newest first: [t, t−1, …], min(t + 1, N_max) checkpoints (also the rounds whose D_k are used)."""
    return list(range(t, max(-1, t - max_team_size), -1))


def scored_sets(j: int, members: list[int], cfg: RunConfig) -> list[int]:
    """The sets D_k that player θ_j scores: all of D_O, or only its own D_j."""
    return list(members) if cfg.tpaw.every_player_scores_every_row else [j]


def team_logps(s: stages.Session, policy, t: int, j: int, gen_ids: dict[int, list[list[int]]], cfg: RunConfig) -> dict:
    """{"real": L_θj(y) per prompt, "generated": {k: L_θj(y′) per prompt of D_k}}, once per round.

    θ_t is the policy itself (not trained yet); an older θ_j is loaded, used and released here. The
    file records the cache key it was computed under (θ_j, the rows' digest, the settings); a file
    of another key is refused (``StaleCache`` naming the file and what differs), a missing one recomputed.
    """
    path, stage = s.run_dir.team_logps(t, j), s.run_dir.stage_team(t, j)
    sets = scored_sets(j, list(gen_ids), cfg)
    n, average = len(s.data.examples), cfg.tpaw.logprob_reduction == "mean"
    items = list(zip(s.data.prompt_ids, s.data.real_ids))
    for k in sets:
        items += list(zip(s.data.prompt_ids, gen_ids[k]))
    settings = stages.logp_settings(s, j, cfg)
    key = logp_cache_key(items, settings, average=average, sets=sets)
    if not (s.run_dir.is_done(stage) and path.exists()):
        # θ_t: the policy, its fresh LoRA adapters (if any) changing nothing yet; older θ_j: plain models
        model = policy if j == t else stages.load_iterate(s, j, trainable=False)
        logps = score_sequences(
            model, items, pad_id=s.tokenizer.pad_token_id, batch_size=cfg.train.logprob_batch_size,
            folder=s.run_dir.team_logp_chunks(t, j), accelerator=s.accelerator,
            desc=f"iter {t}: log-probs of θ{j}", average=average, settings=settings,
        )
        if j != t:
            del model  # the reference is gone before the next one is loaded
            stages.release()
        if s.main:
            generated = {str(k): logps[n * (c + 1) : n * (c + 2)] for c, k in enumerate(sets)}
            atomic_write_json(path, {"checkpoint": j, "real": logps[:n], "generated": generated, "cache_key": key})
            s.run_dir.mark_done(stage, {"sets": sets})
        s.accelerator.wait_for_everyone()
    data = json.loads(path.read_text())
    check_cache_key(path, data.get("cache_key"), key)
    return {"real": data["real"], "generated": {int(k): v for k, v in data["generated"].items()}}


def build_rows(s: stages.Session, members: list[int], gen_ids: dict[int, list[list[int]]], scores: dict,
               keep: dict[int, list[bool]]) -> list[TeamRecord]:
    """One row per (set D_k, prompt) that ``keep`` keeps, sets newest first; column c holds
    θ_{members[c]}'s log-probs."""
    rows = []
    for k in members:
        for i in (i for i in range(len(s.data.examples)) if keep[k][i]):
            mask = [k in scores[j]["generated"] for j in members]
            rows.append(TeamRecord(
                s.data.prompt_ids[i], s.data.real_ids[i], gen_ids[k][i],
                [scores[j]["real"][i] if m else math.nan for j, m in zip(members, mask)],
                [scores[j]["generated"][k][i] if m else math.nan for j, m in zip(members, mask)],
                mask,
            ))
    return rows


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    if cfg.tpaw.max_team_size < 1:
        raise ValueError(f"tpaw.max_team_size must be >= 1, got {cfg.tpaw.max_team_size}")
    return stages.run_iterations(cfg, cfg.tpaw.iterations, iteration, force=force)


def iteration(s: stages.Session, t: int, icfg: RunConfig, model):
    """TPAW round t from θ_t (``model``: newest player, sampler and starting point); returns the
    training result and the round's info."""
    members = team(t, icfg.tpaw.max_team_size)  # [t, t−1, t−2]: θ_t is column 0

    # 1. generate D_t with θ_t; reuse D_{t−1}, D_{t−2}
    samples = {t: stages.generate(s, model, t, "generated", icfg)} | {k: stages.generated_set(s, k) for k in members[1:]}

    # 2. D_O's rows: the ids each player sampled (rows with a truncated y′ out if on_truncated=drop)
    tok, max_len = s.tokenizer, icfg.data.max_length
    gen_ids = {k: [stages.response_ids(s, i, y, max_len) for i, y in enumerate(samples[k])] for k in members}
    keep = {k: [stages.kept([y], icfg) for y in samples[k]] for k in members}

    # 3. team log-probs: θ_t (the policy, untrained) first, then each older checkpoint in turn
    scores = {j: team_logps(s, model, t, j, gen_ids, icfg) for j in members}
    records = build_rows(s, members, gen_ids, scores, keep)
    if not records:
        raise RuntimeError(f"round {t}: generation.on_truncated=drop left no rows")
    if s.main:
        atomic_write_json(s.run_dir.team(t), {
            "players": members, "sets": members, "rows": len(records),
            "every_player_scores_every_row": icfg.tpaw.every_player_scores_every_row,
            "logprob_reduction": icfg.tpaw.logprob_reduction,
        })

    # 4. train θ from θ_t on the TPAW loss (5. the caller saves θ_{t+1}, evaluates it, marks t done)
    result = stages.train_iteration(
        s, t, icfg, model, records, collate=partial(collate_team, pad_id=tok.pad_token_id, share_prompt=stages.shares_prompt(s, icfg, model)),
        loss_step=partial(
            tpaw_step, average=icfg.tpaw.logprob_reduction == "mean", scale=icfg.tpaw.scale,
            eta=icfg.tpaw.target_weight_eta, gamma=icfg.tpaw.player_temperature_gamma,
            detach_player_weights=icfg.tpaw.detach_player_weights, nll_coef=icfg.tpaw.nll_coef,
        ),
    )
    return result, {"rows": len(records), "team": members, **stages.inert_rows(records)}  # y′ = y: no gradient

