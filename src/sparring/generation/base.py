"""The generator interface: token-id prompts in, completions out; sampling only from config."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from sparring.config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # besides every end id the model and its template declare

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> SamplingParams:
        return cls(cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, tuple(cfg.stop_token_ids))

    @classmethod
    def greedy(cls, max_new_tokens: int) -> SamplingParams:
        return cls(do_sample=False, max_new_tokens=max_new_tokens)


@dataclass
class Completion:
    """One sampled response. Training uses ``token_ids``; ``text`` is for files, rewards and reports."""

    text: str  # token_ids decoded without special tokens (the closing stop id left out), nothing stripped
    token_ids: list[int]  # the sampled ids, up to and including the stop id that ended the turn
    finished: bool  # a stop id was sampled within max_new_tokens (else the response was truncated)


def complete(tokenizer, sampled: list[int], stops: list[int]) -> Completion:
    """A Completion from a row of sampled ids: cut after the first stop id (what follows is padding)."""
    end = next((k for k, t in enumerate(sampled) if t in stops), None)
    ids = sampled if end is None else sampled[: end + 1]
    text = tokenizer.decode(ids if end is None else ids[:-1], skip_special_tokens=True)
    return Completion(text, ids, end is not None)


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        """Complete every prompt (token ids, as rendered by ``sparring.data.chat``) once."""
        ...


def batch_seed(seed: int, *parts: int | str) -> int:
    """A seed for one batch, fixed by its position, so a resumed run draws the same samples."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
