"""SPIN: Self-Play Fine-Tuning (Chen et al., ICML 2024, arXiv 2401.01335).

For iteration t = 0 … T−1, starting from the SFT model θ_0:

1. generate: θ_t samples one response y′ for every training prompt x (the opponent's move);
2. pairs: (x, y, y′) for this iteration, plus the pairs of the ``spin.mix_previous`` iterations before;
3. precompute: L_θt(y) and L_θt(y′) once, in inference mode (θ_t is the frozen opponent/reference);
4. train: θ ← θ_t, minimise mean ℓ(λ·[(L_θ(y) − L_θt(y)) − (L_θ(y′) − L_θt(y′))]) (``spin_loss``),
   plus ``spin.nll_coef``·NLL(y) when that extension (RPO-style, off by default) is on;
5. save θ_{t+1}, evaluate it on held-out data, mark the iteration done.

With LoRA (the ``peft:`` section) θ is θ_t plus fresh adapters, merged into θ_{t+1} at step 5.

    sparring run configs/spin/tiny.yaml spin.iterations=2
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from sparring import stages
from sparring.config import RunConfig
from sparring.data import encode
from sparring.logprobs import (
    Sequences,
    SharedPrompt,
    collate_responses,
    response_logps,
    response_tokens,
)
from sparring.losses import LossOutput, spin_loss
from sparring.state import write_jsonl
from sparring.training import score_sequences

READS = ("data", "generation", "train", "spin", "per_iteration")  # + config.COMMON_FIELDS


class PairRecord(NamedTuple):
    prompt_ids: list[int]
    real_ids: list[int]
    generated_ids: list[int]
    opponent_real: float  # L_θt(y)
    opponent_generated: float  # L_θt(y′)


class PairBatch(NamedTuple):
    # (2B, T): the B real sequences, then the B generated ones; or (B, T) with the prompt shared
    sequences: Sequences | SharedPrompt
    opponent_real: torch.Tensor  # (B,)
    opponent_generated: torch.Tensor  # (B,)


def collate_pairs(records: list[PairRecord], pad_id: int, share_prompt: bool = False) -> PairBatch:
    rows = [(r.prompt_ids, [r.real_ids, r.generated_ids]) for r in records]
    return PairBatch(
        collate_responses(rows, pad_id, share_prompt=share_prompt),
        torch.tensor([r.opponent_real for r in records], dtype=torch.float32),
        torch.tensor([r.opponent_generated for r in records], dtype=torch.float32),
    )


def spin_step(model, batch: PairBatch, *, scale: float, kind: str, nll_coef: float = 0.0) -> LossOutput:
    real, generated = response_logps(model, batch.sequences, 2)  # (B,) each, one forward for both
    real_tokens = response_tokens(batch.sequences, 2)[:, 0] if nll_coef else None  # (B,) |y|
    return spin_loss(real, generated, batch.opponent_real, batch.opponent_generated, scale=scale, kind=kind,
                     nll_coef=nll_coef, real_tokens=real_tokens)


def build_pairs(s: stages.Session, t: int, cfg: RunConfig) -> list[tuple[int, dict]]:
    """(example index, y′) for iteration t's pairs: its own samples, then earlier iterations' samples;
    pairs with a truncated y′ are left out when ``generation.on_truncated=drop``."""
    pairs = []
    for k in range(t, max(-1, t - cfg.spin.mix_previous - 1), -1):
        pairs += [(i, y) for i, y in enumerate(opponent_set(s, k, cfg)) if stages.kept([y], cfg)]
    return pairs


def uses_dataset_generated(s: stages.Session, t: int, cfg: RunConfig) -> bool:
    return t == 0 and cfg.spin.use_dataset_generated and all(e.generated is not None for e in s.data.examples)


def opponent_set(s: stages.Session, t: int, cfg: RunConfig) -> list[dict]:
    """y′ of iteration t: from the data at t = 0 when rows carry them (encoded as the real y is), else
    the token ids θ_t sampled."""
    if uses_dataset_generated(s, t, cfg):
        return [{"text": e.generated, "token_ids": encode(s.tokenizer, e.prompt, e.generated)[1], "finished": True}
                for e in s.data.examples]
    return stages.generated_set(s, t)


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    return stages.run_iterations(cfg, cfg.spin.iterations, iteration, force=force)


def iteration(s: stages.Session, t: int, icfg: RunConfig, model):
    """SPIN iteration t (Algorithm 1) from θ_t (``model``: opponent, reference and starting point);
    returns the training result and the iteration's info."""
    # 1. generate y′ ~ π_θt (skipped when iteration 0 reuses the data's y′)
    if not uses_dataset_generated(s, t, icfg):
        stages.generate(s, model, t, "generated", icfg)

    # 2. pairs (x, y, y′), this iteration's and the mixed-in earlier ones
    pairs = build_pairs(s, t, icfg)
    tok, max_len = s.tokenizer, icfg.data.max_length
    gen_ids = [stages.response_ids(s, i, y, max_len) for i, y in pairs]
    if not pairs:
        raise RuntimeError(f"iteration {t}: every y′ was truncated and generation.on_truncated=drop left no pairs")

    # 3. opponent log-probs under θ_t, once: every real response once, every y′ once
    n = len(s.data.examples)
    items = list(zip(s.data.prompt_ids, s.data.real_ids)) + [
        (s.data.prompt_ids[i], g) for (i, _), g in zip(pairs, gen_ids)
    ]
    logps = score_sequences(
        model, items, pad_id=tok.pad_token_id, batch_size=icfg.train.logprob_batch_size,
        folder=s.run_dir.opponent_logp_chunks(t), accelerator=s.accelerator,
        desc=f"iter {t}: opponent log-probs", settings=stages.logp_settings(s, t, icfg),
    )
    records = [
        PairRecord(s.data.prompt_ids[i], s.data.real_ids[i], g, logps[i], logps[n + j])
        for j, ((i, _), g) in enumerate(zip(pairs, gen_ids))
    ]
    if s.main and not s.run_dir.pairs(t).exists():
        write_jsonl(s.run_dir.pairs(t), [
            {"example": i, "generated": y["text"], "finished": y["finished"], "opponent_real": r.opponent_real, "opponent_generated": r.opponent_generated}
            for (i, y), r in zip(pairs, records)
        ])

    # 4. train θ from θ_t on the SPIN loss (5. the caller saves θ_{t+1}, evaluates it, marks t done)
    result = stages.train_iteration(
        s, t, icfg, model, records, collate=partial(collate_pairs, pad_id=tok.pad_token_id, share_prompt=stages.shares_prompt(s, icfg, model)),
        loss_step=partial(spin_step, scale=icfg.spin.scale, kind=icfg.spin.loss, nll_coef=icfg.spin.nll_coef),
    )
    return result, {"pairs": len(records), **stages.inert_rows(records)}

