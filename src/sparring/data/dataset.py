"""The training prompts of a run: examples loaded, shuffled, subsampled and tokenized once."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sparring.config import DataConfig
from sparring.data.chat import encode
from sparring.data.records import DataError, Example, LoadReport, load_examples
from sparring.data.sources import load_rows


@dataclass
class TrainingSet:
    examples: list[Example]
    prompt_ids: list[list[int]]  # rendered prompt (with generation prompt) ids
    real_ids: list[list[int]]  # rendered real response ids, cut to data.max_length
    report: LoadReport


class PromptTooLong(DataError):
    """A row whose rendered prompt has more tokens than ``data.max_prompt_length``."""


def encode_checked(tokenizer, example: Example, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a row, uncut; raises ``NotAPrefixError`` when its prompt ids are not a
    prefix of its prompt + response ids, ``PromptTooLong`` over ``max_prompt_length``: both bad rows."""
    prompt, response = encode(tokenizer, example.prompt, example.real)
    if len(prompt) > max_prompt_length:
        raise PromptTooLong(f"prompt has {len(prompt)} tokens, more than data.max_prompt_length={max_prompt_length}")
    return prompt, response


def load_training_set(cfg: DataConfig, tokenizer) -> TrainingSet:
    def too_long(example: Example) -> str | None:
        try:
            encode_checked(tokenizer, example, cfg.max_prompt_length)
        except DataError as err:
            return str(err)
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
