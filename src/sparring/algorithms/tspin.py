"""T-SPIN: Triplets Better Than Pairs: Towards Stable and Effective Self-Play Fine-Tuning for LLMs (Wang et al.,
NeurIPS 2025, arXiv 2601.08198).

Once, before iteration 0, θ_0 samples one proto-synthetic response y₀ per prompt (iter_000/proto.jsonl,
never regenerated). Then for iteration t = 0 … T−1:

1. generate: θ_t samples one synthetic response y′ for every training prompt x;
2. triplets: (x, y, y′, y₀), this iteration's y′ only (the paper mixes no earlier iteration's samples);
3. nothing to precompute: the loss is reference-free, θ_t and θ_0 only served as samplers;
4. train: θ ← θ_t, minimise mean ℓ(α(a − b)) + β_t·ℓ(α(b − c)) with a, b, c = L_θ(y), L_θ(y′), L_θ(y₀)
   (``tspin_loss``; α = ``tspin.scale``, β_t = ``tspin.history_weight[min(t, len − 1)]``), one policy
   forward of the 3B sequences per batch;
5. save θ_{t+1}, evaluate it on held-out data, mark the iteration done.

With LoRA (the ``peft:`` section) θ is θ_t plus fresh adapters, merged into θ_{t+1} at step 5.

At iteration 0, y′ and y₀ are two independent sample sets of θ_0 (different seeds: the generation seed
is derived from the set's name). β_0 = 0 in the paper, so y₀ does not matter there; drawing it
separately keeps y₀ a fixed anchor that is not the iteration-0 opponent set.

    sparring run configs/tspin/tiny.yaml tspin.iterations=2
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from sparring import stages
from sparring.config import RunConfig
from sparring.logprobs import (
    Sequences,
    SharedPrompt,
    collate_responses,
    response_logps,
)
from sparring.losses import LossOutput, tspin_loss
from sparring.state import atomic_write_json, write_jsonl

PROTO = "proto"  # iter_000/proto.jsonl: y₀ ~ π_θ0, drawn once

# + config.COMMON_FIELDS. train.logprob_batch_size does nothing here (no log-prob precompute), but stays
# accepted: the experiments give the SPIN, T-SPIN and TPAW arms one shared override list.
READS = ("data", "generation", "train", "tspin", "per_iteration")


class TripletRecord(NamedTuple):
    prompt_ids: list[int]
    real_ids: list[int]  # y
    generated_ids: list[int]  # y′ ~ π_θt
    proto_ids: list[int]  # y₀ ~ π_θ0


def collate_triplets(records: list[TripletRecord], pad_id: int, share_prompt: bool = False) -> Sequences | SharedPrompt:
    """(3B, T): the B real sequences, then the B generated ones, then the B proto-synthetic ones; or with
    ``share_prompt`` (B, T) rows [x, y, ·, y′, ·, y₀] (``logprobs.SharedPrompt``)."""
    rows = [(r.prompt_ids, [r.real_ids, r.generated_ids, r.proto_ids]) for r in records]
    return collate_responses(rows, pad_id, share_prompt=share_prompt)


def tspin_step(model, batch: Sequences | SharedPrompt, *, scale: float, history_weight: float, kind: str) -> LossOutput:
    real, generated, proto = response_logps(model, batch, 3)  # (B,) each: one policy forward, no reference
    out = tspin_loss(real, generated, proto, scale=scale, history_weight=history_weight, kind=kind)
    # T-SPIN's reward is α·L_θ(z) (no reference): log SPIN's reward names too, for the shared report.
    out.metrics["rewards/real"] = scale * real.detach().mean()
    out.metrics["rewards/generated"] = scale * generated.detach().mean()
    out.metrics["rewards/margins"] = out.metrics["tspin/current_margin"]
    return out


def history_weight(cfg: RunConfig, t: int) -> float:
    """β_t: ``tspin.history_weight[t]``, the last value repeating."""
    weights = cfg.tspin.history_weight
    if not weights:
        raise ValueError("tspin.history_weight must list at least one value")
    return weights[min(t, len(weights) - 1)]


def proto_set(s: stages.Session, model, t: int, cfg: RunConfig) -> list[dict]:
    """y₀: sampled by θ_0 at iteration 0 (``model`` is θ_0 then), read back unchanged afterwards."""
    if t == 0:
        samples = stages.generate(s, model, 0, PROTO, cfg)
        source = s.run_dir.generated_source(0, PROTO)
        if s.main and not source.exists():  # which checkpoint drew y₀, for the record
            atomic_write_json(source, {
                "checkpoint": cfg.model.name_or_path, "revision": cfg.model.revision, "iteration": 0,
                "file": str(s.run_dir.generated(0, PROTO).relative_to(s.run_dir.root)), "generation": vars(cfg.generation),
            })
        return samples
    return stages.generated_set(s, 0, PROTO)


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    betas = [history_weight(cfg.for_iteration(t), t) for t in range(cfg.tspin.iterations)]
    if min(betas) < 0:
        raise ValueError(f"tspin.history_weight must be >= 0, got {betas}")
    return stages.run_iterations(cfg, cfg.tspin.iterations, partial(iteration, betas=betas), force=force)


def iteration(s: stages.Session, t: int, icfg: RunConfig, model, *, betas: list[float]):
    """T-SPIN iteration t from θ_t (``model``: sampler of y′ and starting point, not a reference) with
    history weight β_t = ``betas[t]``; returns the training result and the iteration's info."""
    # 1. generate y₀ ~ π_θ0 (iteration 0 only) and y′ ~ π_θt
    protos = proto_set(s, model, t, icfg)
    generated = stages.generate(s, model, t, "generated", icfg)

    # 2. triplets (x, y, y′, y₀), the sampled ids as drawn (with on_truncated=drop, whole rows out)
    tok, max_len = s.tokenizer, icfg.data.max_length
    rows = [i for i in range(len(s.data.examples)) if stages.kept([generated[i], protos[i]], icfg)]
    if not rows:
        raise RuntimeError(f"iteration {t}: generation.on_truncated=drop left no triplets")
    records = [
        TripletRecord(
            s.data.prompt_ids[i], s.data.real_ids[i],
            stages.response_ids(s, i, generated[i], max_len), stages.response_ids(s, i, protos[i], max_len),
        )
        for i in rows
    ]
    beta = betas[t]
    if s.main and not s.run_dir.triplets(t).exists():
        write_jsonl(s.run_dir.triplets(t), [
            {"example": i, "generated": generated[i]["text"], "proto": protos[i]["text"], "history_weight": beta}
            for i in rows
        ])

    # 3. (no precompute: T-SPIN has no opponent or reference log-probs)
    # 4. train θ from θ_t on the T-SPIN loss (5. the caller saves θ_{t+1}, evaluates it, marks t done)
    result = stages.train_iteration(
        s, t, icfg, model, records, collate=partial(collate_triplets, pad_id=tok.pad_token_id, share_prompt=stages.shares_prompt(s, icfg, model)),
        loss_step=partial(tspin_step, scale=icfg.tspin.scale, history_weight=beta, kind=icfg.tspin.loss),
    )
    # y′ = y: the first margin carries no gradient
    return result, {"triplets": len(records), "history_weight": beta, **stages.inert_rows(records)}

