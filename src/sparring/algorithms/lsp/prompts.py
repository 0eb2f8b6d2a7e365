"""LSP's prompts: the challenger prompt ⟨cp⟩ (Box 1), its difficulty slot, and data prompts for the
GRPO baseline (``lsp.query_source: data``) in a seeded, resumable order.

Kuba et al. 2025 (arXiv 2509.07414).
"""

from __future__ import annotations

from sparring.config import LspConfig
from sparring.generation import batch_seed

# Our wording of the paper's Box 1 (spec lsp.md B.3): background, request, details, final remarks.
# {task} and {template} are filled with str.replace, so other braces (the example) stay literal.
CHALLENGER_PROMPT = """\
A language task turns an input into an output. In question answering, for instance, the input is a \
question and the output is its answer; in title writing, the input is an essay and the output is a \
title for it.

Your request: write one input for the task "{task}". It will be handed to another language agent, \
which has to produce the output. The input must be a valid input for that task. It may be easy, of \
intermediate difficulty, hard, or simply noisy; try to stress-test the agent or push it to think \
outside the box. Write exactly one example.

Details: the template of the input sits between the markers [Start Generation] and [End Generation]. \
Copy the template's text without the markers and replace every placeholder in curly braces with \
content of your own. For example, "Which topping suits {ice cream flavor} ice cream best?" could \
become "Which topping suits pistachio ice cream best?".

[Start Generation]
{template}
[End Generation]

Final remarks: do not write the output or any response, hints or leaked information; do not ask for \
anything a language agent cannot do; do not include the [Start Generation] and [End Generation] tags. \
Stop as soon as the template is filled in. Follow the template strictly, unless both the task and the \
template are None or empty: then use your own judgement.

Once more: write one input for the task "{task}", following the template."""


def challenger_prompt(lsp: LspConfig, difficulty: str | None = None) -> str:
    """⟨cp⟩ with its slots filled; a missing task or template reads "None", as in the paper.
    ``difficulty`` fills the {difficulty} slot (None leaves the text as it is)."""
    text = lsp.challenger_prompt if lsp.challenger_prompt is not None else CHALLENGER_PROMPT
    if difficulty is not None:
        text = text.replace("{difficulty}", difficulty)
    return text.replace("{task}", lsp.task or "None").replace("{template}", lsp.template or "None")


def query_difficulties(lsp: LspConfig) -> list[str | None]:
    """The difficulty each of the N queries asks for: lsp.difficulties cycled (query i gets
    difficulties[i mod len]), or None for every query when the list is empty."""
    d = lsp.difficulties
    return [d[i % len(d)] if d else None for i in range(lsp.num_queries)]


def load_prompts(source: str) -> list[list[dict]]:
    """The prompts of ``lsp.prompts`` (query_source=data): per row, the conversation up to the last
    user turn. Rows: ``messages`` (a trailing assistant turn, the reference answer, is dropped) or
    ``prompt`` (a string or messages; any ``completion`` is ignored)."""
    from sparring.data import load_rows
    from sparring.data.records import DataError

    out = []
    for number, row in enumerate(load_rows(source, "train")):
        messages = row.get("messages", row.get("prompt")) if isinstance(row, dict) else None
        if isinstance(messages, str):
            messages = user_turn(messages)
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "user" and isinstance(messages[-1].get("content"), str)):
            raise DataError(f"{source} row {number}: expected 'messages' or 'prompt' ending in a user turn")
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if len(out) < 1:
        raise DataError(f"{source} holds no prompts")
    return out


def prompt_indices(num_prompts: int, n: int, *, seed: int, step: int) -> list[int]:
    """The N prompt indices of LSP step ``step`` (1-based) under query_source=data.

    The order is the concatenation of epoch permutations π_e = shuffle(0..P−1; seed, e), e = 0, 1, …;
    step t takes positions (t−1)·N … t·N − 1 of it, so every prompt is used once per epoch and the
    draw is a pure function of (seed, step): a resumed run repeats the uninterrupted one."""
    import random

    out, perms = [], {}
    for pos in range((step - 1) * n, step * n):
        epoch = pos // num_prompts
        if epoch not in perms:
            perms[epoch] = list(range(num_prompts))
            random.Random(batch_seed(seed, "lsp", "prompts", epoch)).shuffle(perms[epoch])
        out.append(perms[epoch][pos % num_prompts])
    return out


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
