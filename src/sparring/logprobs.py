"""The one log-prob function: masked sums of response-token log-probs.

It serves training, the opponent/team precompute, LSP's policy and reference passes, and scoring.

Only the logits that are scored are ever computed: the model's LM head runs on the response
positions alone (``logits_to_keep`` with a per-row boolean mask, so right-padded batches of ragged
prompts need no extra padding), and the log-softmax runs over them in chunks with a hand-written
backward, so no float32 copy of the (B, T, V) logits exists (forward or backward).
``plain_sequence_logps`` is the textbook computation the tests compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Sequences(NamedTuple):
    """A right-padded batch of prompt+response sequences."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (what is scored)
    position_ids: torch.Tensor  # (B, T) 0, 1, … along each row


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
    positions = torch.arange(length).expand(len(pairs), length)
    return Sequences(ids, attention, response, positions)


def scored_positions(batch: Sequences) -> torch.Tensor:
    """(B, T) bool: positions t whose next token t+1 is a response token — the only logits needed."""
    keep = torch.zeros_like(batch.response_mask, dtype=torch.bool)
    keep[:, :-1] = batch.response_mask[:, 1:].bool()
    return keep


def forward_logits(model, batch: Sequences, keep: torch.Tensor | None = None) -> torch.Tensor:
    """All logits (B, T, V), or with ``keep`` (B, T) bool only those, flattened row-major to (N, V);
    the LM head then runs on those N positions only."""
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    if keep is None:
        return model(**kwargs).logits
    n = int(keep.sum())
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
        if logits.ndim == 2 and logits.shape[0] == n:
            return logits
    except (TypeError, IndexError):  # a model class without per-row logits_to_keep
        pass
    return model(**kwargs).logits[keep]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T)[target] over chunks of positions, in float32 one chunk at a time.

    Backward: d/dlogits = (onehot(target) − softmax(logits / T)) · grad / T, chunk by chunk, so the
    only full-size tensors are the logits themselves and their gradient, in the model's dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int):  # (B, K, V), (B, K)
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        out = torch.empty(targets.shape, dtype=acc, device=logits.device)  # (B, K)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[1], chunk):
            x = logits[:, s : s + chunk].to(acc) / temperature  # (B, k, V)
            lse[:, s : s + chunk] = torch.logsumexp(x, dim=-1)
            out[:, s : s + chunk] = x.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1) - lse[:, s : s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (B, K)
        logits, targets, lse = ctx.saved_tensors
        t, grad_logits = ctx.temperature, torch.empty_like(logits)
        for s in range(0, logits.shape[1], ctx.chunk):
            g = grad[:, s : s + ctx.chunk, None].to(lse.dtype) / t  # (B, k, 1)
            probs = torch.exp(logits[:, s : s + ctx.chunk].to(lse.dtype) / t - lse[:, s : s + ctx.chunk, None])
            part = -g * probs
            part.scatter_add_(-1, targets[:, s : s + ctx.chunk, None], g)
            grad_logits[:, s : s + ctx.chunk] = part.to(logits.dtype)
        return grad_logits, None, None, None


def selective_logps(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    chunk_elements: int = 2**26) -> torch.Tensor:
    """log softmax(logits / T) at ``targets``, (B, K), in float32 (float64 for float64 logits); chunks of
    ~``chunk_elements`` logits."""
    chunk = max(1, chunk_elements // max(1, logits.shape[0] * logits.shape[2]))
    return _SelectiveLogSoftmax.apply(logits, targets, temperature, chunk)


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs of the next token, zero outside the response.

    logits (B, T, V) from a causal LM on input_ids (B, T); returns (B, T−1), where entry t is
    log p(input_ids[t+1] | input_ids[≤t]) if token t+1 is a response token, else 0. ``temperature``
    scores under softmax(logits / T), the distribution a rollout sampled at temperature T came from.
    """
    logps = selective_logps(logits[:, :-1], input_ids[:, 1:], temperature=temperature)  # (B, T−1)
    return logps * response_mask[:, 1:].to(logps.dtype)


def sequence_logps(model, batch: Sequences, *, average: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """L(z) = Σ_t log π(z_t | x, z_<t) over response tokens, (B,). ``average`` divides by their count."""
    keep = scored_positions(batch)  # (B, T)
    logits = forward_logits(model, batch, keep)  # (N, V), N scored tokens in the batch
    targets = batch.input_ids[:, 1:][keep[:, :-1]]  # (N,) the next tokens, in the same row-major order
    logps = selective_logps(logits[None], targets[None], temperature=temperature)[0]  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) the row of each scored token
    total = torch.zeros(keep.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    if average:
        total = total / keep.sum(-1).clamp(min=1)
    return total


def plain_sequence_logps(model, batch: Sequences, *, average: bool = False) -> torch.Tensor:
    """The textbook computation (full logits, full float32 log-softmax): the reference in tests."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask[:, 1:].to(logps.dtype)
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
