"""The one log-prob function: masked sums of response-token log-probs.

It serves training, the opponent/team precompute, LSP's policy and reference passes, and scoring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Sequences(NamedTuple):
    """A right-padded batch of prompt+response sequences."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (what is scored)


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> Sequences:
    """(prompt ids, response ids) pairs -> one right-padded batch."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), length), dtype=torch.long)
    response = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :n] = 1
        response[i, len(p) : n] = 1
    return Sequences(ids, attention, response)


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs of the next token, zero outside the response.

    logits (B, T, V) from a causal LM on input_ids (B, T); returns (B, T−1), where entry t is
    log p(input_ids[t+1] | input_ids[≤t]) if token t+1 is a response token, else 0. ``temperature``
    scores under softmax(logits / T), the distribution a rollout sampled at temperature T came from.
    """
    logits = logits[:, :-1].float()  # (B, T−1, V) fp32 for a stable log-softmax
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]  # (B, T−1)
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)  # (B, T−1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * response_mask[:, 1:].to(logps.dtype)


def sequence_logps(model, batch: Sequences, *, average: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """L(z) = Σ_t log π(z_t | x, z_<t) over response tokens, (B,). ``average`` divides by their count."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    per_token = token_logps(logits, batch.input_ids, batch.response_mask, temperature=temperature)  # (B, T−1)
    total = per_token.sum(-1)
    if average:
        total = total / batch.response_mask[:, 1:].sum(-1).clamp(min=1)
    return total
