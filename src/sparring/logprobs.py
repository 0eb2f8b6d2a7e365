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


class SharedPrompt(NamedTuple):
    """Rows [x, r_1, x_last, r_2, …, x_last, r_S]: one prompt x and its S responses in one sequence, each
    response after the first behind a copy of x's last token, with an attention bias that lets every
    response branch see x (all of x for r_1, x without its last token plus the copy for the others) and
    itself but no other branch, and positions that restart at the prompt's end in every branch. Each
    response is scored exactly as in its own sequence (x, r_s), and x runs through the model once."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens (what tokens/s counts)
    attention_bias: torch.Tensor  # (B, 1, T, T) 0 where a query may attend to a key, dtype min elsewhere
    position_ids: torch.Tensor  # (B, T)
    segment: torch.Tensor  # (B, T) s on the tokens of response s (1 … S), 0 elsewhere


def collate_shared(rows: list[tuple[list[int], list[list[int]]]], pad_id: int,
                   dtype: torch.dtype = torch.float32) -> SharedPrompt:
    """(prompt ids, [response ids, …]) rows -> one right-padded SharedPrompt batch."""
    layouts = [_shared_layout(p, responses) for p, responses in rows]
    length = max(len(ids) for ids, _, _, _ in layouts)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    segment = torch.zeros((b, length), dtype=torch.long)
    allowed = torch.zeros((b, length, length), dtype=torch.bool)
    for i, (row_ids, row_pos, row_seg, row_allowed) in enumerate(layouts):
        n = len(row_ids)
        ids[i, :n], positions[i, :n], segment[i, :n] = (torch.tensor(v) for v in (row_ids, row_pos, row_seg))
        attention[i, :n] = 1
        allowed[i, :n, :n] = row_allowed
        allowed[i, n:, 0] = True  # padding queries attend to something (no row of -inf: no NaN)
    bias = torch.zeros((b, 1, length, length), dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return SharedPrompt(ids, attention, bias, positions, segment)


def _shared_layout(prompt: list[int], responses: list[list[int]]):
    """One row of ``SharedPrompt``: its ids, positions, segments and (n, n) attention pattern."""
    p = len(prompt)
    ids, pos, seg, starts = list(prompt), list(range(p)), [0] * p, []
    for s, response in enumerate(responses, 1):
        if s > 1:  # the branch starts with a copy of x's last token, at x's last position
            starts.append(len(ids))
            ids.append(prompt[-1])
            pos.append(p - 1)
            seg.append(0)
        ids += response
        pos += list(range(p, p + len(response)))
        seg += [s] * len(response)
    n = len(ids)
    causal = torch.ones((n, n), dtype=torch.bool).tril_()
    allowed = torch.zeros((n, n), dtype=torch.bool)
    first_end = p + len(responses[0])
    allowed[:first_end, :first_end] = causal[:first_end, :first_end]
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n
        allowed[start:end, : p - 1] = True  # x but its last token, which the branch holds a copy of
        allowed[start:end, start:end] = causal[: end - start, : end - start]
    return ids, pos, seg, allowed


def attention_of(model) -> str:
    """The model's attention implementation (HF's ``config._attn_implementation``; under DDP, the wrapped model's)."""
    return getattr(getattr(getattr(model, "module", model), "config", None), "_attn_implementation", None) or "sdpa"


def takes_attention_bias(model) -> bool:
    """Whether the model's attention applies a 4D additive mask (``SharedPrompt.attention_bias``): eager and
    sdpa do; FlashAttention-2 and the kernels that take only 2D padding masks do not."""
    return attention_of(model) in ("eager", "sdpa")


def shared_prompt_logps(model, batch: SharedPrompt, responses: int, *, average: bool = False) -> torch.Tensor:
    """L(r_s) = Σ_t log π(r_s,t | x, r_s,<t) for every response s of every row, (B, S); the same values
    as ``sequence_logps`` on the (x, r_s) sequences. ``average`` divides by each response's length."""
    if not takes_attention_bias(model):
        raise ValueError(f"train.share_prompt needs an attention that takes a 4D mask (eager or sdpa); this model "
                         f"uses {attention_of(model)}: load it with sdpa or turn train.share_prompt off")
    dtype = next(model.parameters()).dtype  # the bias in the model's dtype (bf16 / fp16 on a GPU)
    # a Sequences whose attention_mask is the 4D bias (the model takes either) and whose responses are the segments
    view = Sequences(batch.input_ids, batch.attention_bias.to(dtype), batch.segment > 0, batch.position_ids)
    keep, logps = scored_logps(model, view)
    slot = keep.nonzero()[:, 0] * responses + batch.segment[:, 1:][keep[:, :-1]] - 1  # (N,) row · S + s
    return summed(logps, slot, keep.shape[0] * responses, average).view(-1, responses)


def collate_responses(rows: list[tuple[list[int], list[list[int]]]], pad_id: int, *,
                      share_prompt: bool = False) -> Sequences | SharedPrompt:
    """(prompt ids, [S response ids]) rows as one batch: S·B sequences (x, r_s), response 1 of every row
    first, then response 2, …; or with ``share_prompt`` one ``SharedPrompt`` row per prompt."""
    if share_prompt:
        return collate_shared(rows, pad_id)
    return collate([(p, rs[s]) for s in range(len(rows[0][1])) for p, rs in rows], pad_id)


def response_logps(model, batch: Sequences | SharedPrompt, responses: int, *, average: bool = False):
    """L_θ of each of the S responses of every row of a ``collate_responses`` batch: S tensors of (B,)."""
    if isinstance(batch, SharedPrompt):
        return shared_prompt_logps(model, batch, responses, average=average).unbind(-1)
    return sequence_logps(model, batch, average=average).chunk(responses)


def response_tokens(batch: Sequences | SharedPrompt, responses: int) -> torch.Tensor:
    """(B, S): the scored tokens of each response of every row of a ``collate_responses`` batch."""
    if isinstance(batch, SharedPrompt):
        return torch.stack([(batch.segment == s + 1).sum(-1) for s in range(responses)], -1)
    return scored_positions(batch).sum(-1).view(responses, -1).T


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


def scored_logps(model, batch: Sequences, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (B, T) bool: the positions whose next token is a response token, their log-probs (N,), row-major)."""
    keep = scored_positions(batch)  # (B, T)
    logits = forward_logits(model, batch, keep)  # (N, V), N scored tokens in the batch
    targets = batch.input_ids[:, 1:][keep[:, :-1]]  # (N,) the next tokens, in the same row-major order
    return keep, selective_logps(logits[None], targets[None], temperature=temperature)[0]


def summed(logps: torch.Tensor, slot: torch.Tensor, size: int, average: bool) -> torch.Tensor:
    """(size,) the sums of ``logps`` by ``slot`` (a response's index), or with ``average`` their means."""
    total = torch.zeros(size, dtype=logps.dtype, device=logps.device).index_add(0, slot, logps)
    if average:
        total = total / torch.bincount(slot, minlength=size).clamp(min=1)
    return total


def sequence_logps(model, batch: Sequences, *, average: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """L(z) = Σ_t log π(z_t | x, z_<t) over response tokens, (B,). ``average`` divides by their count."""
    keep, logps = scored_logps(model, batch, temperature)
    return summed(logps, keep.nonzero()[:, 0], keep.shape[0], average)


def plain_sequence_logps(model, batch: Sequences, *, average: bool = False) -> torch.Tensor:
    """The textbook computation (full logits, full float32 log-softmax): the reference in tests."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask[:, 1:].to(logps.dtype)
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
