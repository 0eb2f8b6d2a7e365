"""The one chat rendering used by generation, training, log-prob passes and evaluation.

A prompt is rendered with the tokenizer's chat template and the generation prompt; a response is
the text the template adds after that prompt when the assistant turn is appended (so the template's
end-of-turn marker is part of the response). Token ids are prompt ids followed by response ids:
the ids a generator is fed are exactly a prefix of the ids a trainer scores.
"""

from __future__ import annotations

# Used only when a tokenizer has no chat template (base models): plain "User:/Assistant:" turns.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def _template(tokenizer) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    return tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True, chat_template=_template(tokenizer)
    )


def render_response(tokenizer, prompt: list[dict], response: str) -> str:
    """The text after the rendered prompt once ``response`` is appended as an assistant turn."""
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": response}], tokenize=False, chat_template=_template(tokenizer)
    )
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    # Templates that rewrite earlier turns (rare): keep the response and close it with EOS.
    return response + (tokenizer.eos_token or "")


def encode(
    tokenizer, prompt: list[dict], response: str | None = None, *, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); the response is cut so that both fit in ``max_length`` tokens."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if response is None:
        return prompt_ids, []
    response_ids = tokenizer(render_response(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    if max_length is not None:
        response_ids = response_ids[: max(max_length - len(prompt_ids), 0)]
    return prompt_ids, response_ids
