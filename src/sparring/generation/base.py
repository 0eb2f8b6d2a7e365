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

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> SamplingParams:
        return cls(cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens)

    @classmethod
    def greedy(cls, max_new_tokens: int) -> SamplingParams:
        return cls(do_sample=False, max_new_tokens=max_new_tokens)


@dataclass
class Completion:
    text: str  # decoded without special tokens, end-of-turn removed
    token_ids: list[int]  # generated ids up to (not including) EOS
    finished: bool  # EOS was produced within max_new_tokens


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        """Complete every prompt (token ids, as rendered by ``sparring.data.chat``) once."""
        ...


def batch_seed(seed: int, *parts: int | str) -> int:
    """A seed for one batch, fixed by its position, so a resumed run draws the same samples."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
