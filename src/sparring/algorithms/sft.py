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

from functools import partial
from typing import NamedTuple

from sparring import stages
from sparring.config import RunConfig
from sparring.evaluation.report import write_report
from sparring.logprobs import Sequences, collate, sequence_logps
from sparring.losses import LossOutput
from sparring.modeling import check_peft
from sparring.training import train

READS = ("data", "train")  # + config.COMMON_FIELDS


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
    check_peft(cfg.peft)
    s = stages.open_session(cfg, force=force)
    stages.evaluate_stage(s, s.run_dir.INITIAL, path=None)
    if not s.run_dir.is_done(s.run_dir.stage_iteration(0)):
        model = stages.load_iterate(s, 0)  # θ_0 (with fresh adapters under peft:)
        records = [SftRecord(p, r) for p, r in zip(s.data.prompt_ids, s.data.real_ids)]
        result = train(
            model, records, collate=partial(collate_sft, pad_id=s.tokenizer.pad_token_id), loss_step=sft_step,
            cfg=cfg.train, accelerator=s.accelerator, folder=s.run_dir.iteration(0), logger=s.logger,
            log_fields={"iteration": 0}, desc="sft", weight=lambda r: len(r.response_ids),
        )
        stages.finish_iteration(s, 0, result, {"examples": len(records)})
        del model, result
        stages.release(s)
    return write_report(s.run_dir, cfg, main=s.main)
