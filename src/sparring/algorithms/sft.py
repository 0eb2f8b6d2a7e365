"""SFT: supervised fine-tuning on (prompt, response) data — the stage before SPIN from a base model.

One iteration on the shared epoch loop, starting from ``model.name_or_path`` (θ_0):

1. data: the rows of ``data.source`` (messages, prompt-completion or SPIN format), rendered with the
   tokenizer's chat template; the loss is on the response tokens only;
2. train: minimise the mean token NLL over all the response tokens of each optimizer step (every
   micro-batch, every process), −Σ log π_θ(y|x) / Σ|y|, for ``train.epochs`` epochs — TRL's
   SFTTrainer's normalisation (``num_items_in_batch``): each example's −(1/|y|)·log π_θ(y|x)
   weighted by its |y| (``train(weight=)``);
3. save θ_1 (``run_dir.model(0)``, LoRA adapters merged under ``peft:``), evaluate it on held-out
   data, mark the iteration done.

    sparring sft configs/sft/tiny.yaml          # = sparring run with method: sft
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import NamedTuple

from sparring import stages
from sparring.config import RunConfig, TrainConfig
from sparring.logprobs import Sequences, collate, sequence_logps
from sparring.losses import LossOutput

# + config.COMMON_FIELDS; every train field but logprob_batch_size (no log-prob pass) and share_prompt (one response).
READS = ("data", *(f"train.{f.name}" for f in fields(TrainConfig) if f.name not in ("logprob_batch_size", "share_prompt")))


class SftRecord(NamedTuple):
    prompt_ids: list[int]
    response_ids: list[int]


def collate_sft(records: list[SftRecord], pad_id: int) -> Sequences:
    return collate([(r.prompt_ids, r.response_ids) for r in records], pad_id)


def sft_step(model, batch: Sequences) -> LossOutput:
    """Per example: the response's mean token NLL (B,); ``logps`` is its mean token log-prob."""
    logps = sequence_logps(model, batch, average=True)  # (B,)
    return LossOutput(-logps, {"logps": logps.detach().mean()})


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    return stages.run_iterations(cfg, 1, iteration, force=force)


def iteration(s: stages.Session, t: int, icfg: RunConfig, model):
    """θ_1 from θ_0 (``model``, with fresh adapters under peft:) on the data's (prompt, real response) rows."""
    records = [SftRecord(p, r) for p, r in zip(s.data.prompt_ids, s.data.real_ids)]
    result = stages.train_iteration(s, t, icfg, model, records, collate=partial(collate_sft, pad_id=s.tokenizer.pad_token_id),
                                    loss_step=sft_step, weight=lambda r: len(r.response_ids), desc="sft")
    return result, {"examples": len(records)}
