"""The one chat rendering used by generation, training, log-prob passes and evaluation.

Token-exact rules (docs/algorithms.md, "Tokens"):

- A prompt is the conversation rendered with the chat template and its generation prompt; a prompt
  plus response is the same conversation with the assistant turn appended, rendered and tokenized
  as ONE string. The response ids are the continuation after the prompt's ids (as TRL's DPO
  trainer slices them), so no SentencePiece "▁" that never occurs in context is ever added. A
  conversation whose tokenized prompt is not a prefix of its tokenized prompt + response is refused
  (``NotAPrefixError``: a bad row, skipped and counted with ``data.on_bad_row=skip``).
- The template owns the special tokens; the tokenizer's own prefix (BOS for Llama-2 / Mistral /
  Zephyr tokenizers) is put in front when the rendered text does not start with it, as
  ``tokenizer(text)`` does, so a template without ``{{ bos_token }}`` still gives the BOS the
  model was trained with, and one with it never gives two.
- A response ends with the template's end-of-turn token: whatever the template writes after it
  (ChatML's "\\n" between turns) is glue no generator ever samples and is left out, so a sampled y′
  and a real y with the same text have the same ids.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from sparring.data.records import DataError

# Used only when a tokenizer has no chat template (base models): plain "User:/Assistant:" turns. The
# generation prompt ends without a space (a trailing space is a BPE boundary trap: " 5" is one token
# in context, " " then "5" at the prompt's end); an assistant turn is closed by EOS.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_SENTINEL = "\x00sparring-end-of-turn-probe\x00"


class NotAPrefixError(DataError):
    """The tokenized prompt is not a prefix of the tokenized prompt + response."""


@dataclass(frozen=True)
class ChatFormat:
    """What the tokenizer and its template imply for token sequences, worked out once per tokenizer."""

    prefix: tuple[int, ...]  # ids the tokenizer itself puts before text (BOS), () for most BPE tokenizers
    end_of_turn: tuple[int, ...]  # ids that close an assistant turn: the template's marker, then EOS


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template(tokenizer) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE


def chat_format(tokenizer) -> ChatFormat:
    fmt = _FORMATS.get(tokenizer)
    if fmt is None:
        fmt = _FORMATS[tokenizer] = ChatFormat(_special_prefix(tokenizer), _end_of_turn(tokenizer))
    return fmt


def _special_prefix(tokenizer) -> tuple[int, ...]:
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def _end_of_turn(tokenizer) -> tuple[int, ...]:
    """The first special token the template writes after an assistant message, then EOS."""
    text = _render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}])
    suffix = text[text.index(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    ids = [i for i in tokenizer(suffix, add_special_tokens=False)["input_ids"] if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=_template(tokenizer)
    )


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    return _render(tokenizer, prompt, generation_prompt=True)


def tokenize(tokenizer, text: str) -> list[int]:
    """Ids of rendered text: the template's special tokens as written, the tokenizer's prefix once."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = list(chat_format(tokenizer).prefix)
    return prefix + ids if prefix and ids[: len(prefix)] != prefix else ids


def end_turn(tokenizer, response_ids: list[int]) -> list[int]:
    """Response ids cut after the last end-of-turn id (the template's glue between turns dropped)."""
    ends = chat_format(tokenizer).end_of_turn
    for k in range(len(response_ids) - 1, -1, -1):
        if response_ids[k] in ends:
            return response_ids[: k + 1]
    return response_ids


def encode(
    tokenizer, prompt: list[dict], response: str | None = None, *, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); the response is cut so that both fit in ``max_length`` tokens.

    Raises ``NotAPrefixError`` when the template or the tokenizer's merges make the prompt's ids
    differ from the start of the prompt + response's ids.
    """
    prompt_ids = tokenize(tokenizer, render_prompt(tokenizer, prompt))
    if response is None:
        return prompt_ids, []
    full_ids = tokenize(tokenizer, _render(tokenizer, [*prompt, {"role": "assistant", "content": response}]))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        same = next((k for k, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))
        raise NotAPrefixError(
            "the tokenized prompt is not a prefix of the tokenized prompt + response; they differ from token "
            f"{same} ({tokenizer.decode(prompt_ids[same:])!r}): the chat template renders the prompt differently "
            "once the response is appended, or tokens merge across the boundary"
        )
    response_ids = end_turn(tokenizer, full_ids[len(prompt_ids) :])
    if max_length is not None:
        response_ids = response_ids[: max(max_length - len(prompt_ids), 0)]
    return prompt_ids, response_ids


def stop_token_ids(tokenizer, declared=None, extra=()) -> list[int]:
    """Every id that ends a turn: the model's declared EOS (an int or a list, from its
    generation_config), the template's end-of-turn token, the tokenizer's EOS, and ``extra``."""
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    ids: list[int] = []
    for i in [*declared, *chat_format(tokenizer).end_of_turn, *extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids
