"""The training prompts of a run: examples loaded, shuffled, subsampled and tokenized once."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sparring.config import DataConfig
from sparring.data.chat import NotAPrefixError, encode
from sparring.data.records import Example, LoadReport, load_examples
from sparring.data.sources import load_rows


@dataclass
class TrainingSet:
    examples: list[Example]
    prompt_ids: list[list[int]]  # rendered prompt (with generation prompt) ids
    real_ids: list[list[int]]  # rendered real response ids, cut to data.max_length
    report: LoadReport


def load_training_set(cfg: DataConfig, tokenizer) -> TrainingSet:
    def too_long(example: Example) -> str | None:
        try:  # a conversation whose prompt ids are not a prefix of prompt + response ids is a bad row
            n = len(encode(tokenizer, example.prompt, example.real)[0])
        except NotAPrefixError as err:
            return str(err)
        if n > cfg.max_prompt_length:
            return f"prompt has {n} tokens, more than data.max_prompt_length={cfg.max_prompt_length}"
        return None

    examples, report = load_examples(
        load_rows(cfg.source, cfg.split),
        source=cfg.source,
        fmt=cfg.format,
        on_bad_row=cfg.on_bad_row,
        system_prompt=cfg.system_prompt,
        prompt_too_long=too_long,
    )
    if not examples:
        raise ValueError(f"{cfg.source}: no usable rows ({report.rows} rows, skipped {dict(report.skipped)})")
    random.Random(cfg.shuffle_seed).shuffle(examples)
    if cfg.num_prompts:
        examples = examples[: cfg.num_prompts]
    encoded = [encode(tokenizer, e.prompt, e.real, max_length=cfg.max_length) for e in examples]
    return TrainingSet(examples, [p for p, _ in encoded], [r for _, r in encoded], report)
