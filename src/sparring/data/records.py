"""Turn raw rows of any accepted format into ``Example``s, with clear errors for bad rows.

Accepted formats (``data.format: auto`` picks by the fields present):

- ``messages``: a chat; the last assistant turn is the real response, everything before it the
  prompt (multi-turn and system messages kept).
- ``prompt_completion``: ``prompt`` and ``completion``, each a string or a list of messages.
- ``spin``: the released SPIN data (``real`` and ``generated``, both chats ending in an assistant turn).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data source or row that cannot be used."""


@dataclass
class Example:
    prompt: list[Message]  # the conversation before the real response
    real: str  # the annotated (SFT) response y
    generated: str | None = None  # a synthetic response y′ shipped with the data (SPIN format)
    row: int = -1  # index of the source row, for messages


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def _messages(value, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{what}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"'{what}[{i}]' must be a message with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"'{what}[{i}]' has role {m['role']!r}; expected one of {ROLES}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_last_assistant(messages: list[Message], what: str) -> tuple[list[Message], str]:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"'{what}' must end with an assistant message (the real response)")
    if len(messages) < 2:
        raise DataError(f"'{what}' has no prompt before the assistant message")
    return messages[:-1], messages[-1]["content"]


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "real" in row and "generated" in row:
        return "spin"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise DataError(
        f"cannot tell the row format from its fields {sorted(row)}; expected 'messages', "
        "'prompt' + 'completion', or 'real' + 'generated'"
    )


def parse_row(row: dict, fmt: str = "auto", system_prompt: str | None = None) -> Example:
    """One raw row to an Example; raises DataError (without the row number) when it is bad."""
    if not isinstance(row, dict):
        raise DataError(f"row must be an object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    generated = None
    if fmt == "messages":
        if "messages" not in row:
            raise DataError("missing field 'messages'")
        prompt, real = _split_last_assistant(_messages(row["messages"], "messages"), "messages")
    elif fmt == "prompt_completion":
        for name in ("prompt", "completion"):
            if name not in row:
                raise DataError(f"missing field '{name}'")
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = _messages(p, "prompt")
        if isinstance(c, str):
            real = c
        else:
            completion = _messages(c, "completion")
            if completion[-1]["role"] != "assistant":
                raise DataError("'completion' must end with an assistant message")
            real = completion[-1]["content"]
        if isinstance(p, str) and not p.strip():
            raise DataError("'prompt' is empty")
    elif fmt == "spin":
        for name in ("real", "generated"):
            if name not in row:
                raise DataError(f"missing field '{name}'")
        prompt, real = _split_last_assistant(_messages(row["real"], "real"), "real")
        gen_prompt, generated = _split_last_assistant(_messages(row["generated"], "generated"), "generated")
        if gen_prompt != prompt:
            raise DataError("'real' and 'generated' have different prompts")
    else:
        raise DataError(f"unknown data format {fmt!r}")
    if not real.strip():
        raise DataError("the real response is empty")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return Example(prompt=prompt, real=real, generated=generated)


def load_examples(
    rows: list[dict],
    *,
    source: str,
    fmt: str = "auto",
    on_bad_row: str = "error",
    system_prompt: str | None = None,
    prompt_too_long=None,
) -> tuple[list[Example], LoadReport]:
    """Parse every row. A bad row raises DataError naming the row, or is skipped and counted.

    ``prompt_too_long(example) -> str | None`` is the tokenizer-aware length check (a reason or None).
    """
    report = LoadReport(rows=len(rows))
    examples = []
    for number, row in enumerate(rows):
        try:
            example = parse_row(row, fmt, system_prompt)
            reason = prompt_too_long(example) if prompt_too_long else None
            if reason:
                raise DataError(reason)
        except DataError as err:
            if on_bad_row == "skip":
                report.skipped[str(err).split(";")[0]] += 1
                continue
            raise DataError(
                f"{source}: row {number}: {err} (set data.on_bad_row=skip to skip and count bad rows)"
            ) from None
        example.row = number
        examples.append(example)
    report.kept = len(examples)
    return examples, report
