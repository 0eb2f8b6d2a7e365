"""``sparring data check FILE CONFIG``: a data file checked against a run's config before a long run.

Every row is parsed and tokenized as the run would (``data.format``, ``data.system_prompt``, the
model's tokenizer and chat template): counts by row format, bad rows by kind with their row numbers,
token-length histograms of prompts and responses, and how many rows exceed the config's limits
(``data.max_prompt_length``: a bad row; ``data.max_length``: the response is cut).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from sparring.config import DataConfig
from sparring.data.dataset import PromptTooLong, encode_checked
from sparring.data.records import DataError, detect_format, parse_row

SHOWN_ROWS = 10  # row numbers listed per kind of bad row
BINS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # histogram edges, tokens


@dataclass
class DataCheck:
    rows: int = 0
    formats: Counter = field(default_factory=Counter)  # detected row format -> rows
    bad: dict[str, list[int]] = field(default_factory=dict)  # kind of bad row -> row numbers
    prompt_tokens: list[int] = field(default_factory=list)  # of the good rows
    response_tokens: list[int] = field(default_factory=list)  # before any cut to data.max_length
    with_generated: int = 0  # good rows shipping a y′ (SPIN format)
    cut: list[int] = field(default_factory=list)  # rows whose response data.max_length cuts
    over_prompt: list[int] = field(default_factory=list)  # bad rows: prompt over data.max_prompt_length

    @property
    def good(self) -> int:
        return len(self.prompt_tokens)

    @property
    def bad_rows(self) -> int:
        return sum(len(v) for v in self.bad.values())


def kind_of(error: Exception) -> str:
    """A bad row's kind: its message with the numbers in it replaced, so rows of one kind group."""
    return re.sub(r"\d+", "N", str(error).split(";")[0])


def check_rows(rows: list, cfg: DataConfig, tokenizer) -> DataCheck:
    out = DataCheck(rows=len(rows))
    for number, row in enumerate(rows):
        try:
            out.formats[detect_format(row) if isinstance(row, dict) else type(row).__name__] += 1
        except DataError:
            out.formats["unknown"] += 1
        try:
            example = parse_row(row, cfg.format, cfg.system_prompt)
            prompt, response = encode_checked(tokenizer, example, cfg.max_prompt_length)  # as the run reads it
        except DataError as err:
            out.bad.setdefault(kind_of(err), []).append(number)
            if isinstance(err, PromptTooLong):
                out.over_prompt.append(number)
            continue
        out.prompt_tokens.append(len(prompt))
        out.response_tokens.append(len(response))
        out.with_generated += example.generated is not None
        if len(prompt) + len(response) > cfg.max_length:
            out.cut.append(number)
    return out


def histogram(values: list[int]) -> list[tuple[str, int]]:
    """(range, count) over BINS, empty ranges past the largest value left out."""
    edges = [0, *BINS]
    counts = [(f"{lo + 1}-{hi}", sum(lo < v <= hi for v in values)) for lo, hi in zip(edges, edges[1:])]
    counts.append((f">{BINS[-1]}", sum(v > BINS[-1] for v in values)))
    last = max((k for k, (_, c) in enumerate(counts) if c), default=-1)
    return counts[: last + 1]


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def render(check: DataCheck, cfg: DataConfig, source: str) -> str:
    lines = [f"{source}: {check.rows} rows, {check.good} usable, {check.bad_rows} bad",
             "formats: " + ", ".join(f"{name} {n}" for name, n in check.formats.most_common())]
    if check.with_generated:
        lines.append(f"rows with a generated response y′ (SPIN format): {check.with_generated}")
    for kind, numbers in sorted(check.bad.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(map(str, numbers[:SHOWN_ROWS])) + (", …" if len(numbers) > SHOWN_ROWS else "")
        lines.append(f"bad: {len(numbers)} × {kind} (rows {shown})")
    if check.good:
        for name, values in (("prompt", check.prompt_tokens), ("response", check.response_tokens)):
            lines.append(f"{name} tokens: median {percentile(values, 0.5)}, p90 {percentile(values, 0.9)}, "
                         f"p99 {percentile(values, 0.99)}, max {max(values)}")
            width = max(c for _, c in histogram(values))
            lines += [f"  {label:>10} {count:6d} {'#' * round(40 * count / width)}" for label, count in histogram(values)]
        lines.append(f"prompts over data.max_prompt_length={cfg.max_prompt_length}: {len(check.over_prompt)} (bad rows)")
        lines.append(f"responses cut to fit data.max_length={cfg.max_length}: {len(check.cut)}")
    return "\n".join(lines)


def failed(check: DataCheck, cfg: DataConfig) -> str | None:
    """Why the run would stop on this data (None: it would not)."""
    if not check.good:
        return "no usable rows"
    if check.bad and cfg.on_bad_row == "error":
        return f"{check.bad_rows} bad rows and data.on_bad_row=error (fix them, or set data.on_bad_row=skip)"
    return None
