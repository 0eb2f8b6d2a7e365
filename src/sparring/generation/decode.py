"""sparring's own decoding loop for Hugging Face causal LMs: what ``model.generate`` samples, faster.

Why not ``model.generate``: at the batch sizes self-play generation runs (8–64 rows), a decode step
of a small or medium model costs little more than reading its weights once, and ``generate`` adds
to every step a growing ``DynamicCache`` (a ``torch.cat`` of every layer's keys and values), logits
processors over the whole vocabulary and rows that keep being computed after they sampled their
stop id. ``benchmarks/real_shapes.py`` measures the difference. This loop:

- prefills the batch in length-sorted groups of ``PREFILL_ROWS`` rows (left padding only to the
  longest prompt of each group), each group's keys and values copied into one preallocated cache
  (transformers' ``StaticCache``: written in place, never concatenated);
- samples as ``generate`` does, in its order (temperature, then top-k, then top-p, ``GenerationConfig``
  semantics; greedy is the arg-max of the fp32 logits), the softmax and the draw over the kept
  tokens only;
- drops rows that sampled a stop id from the batch (their cache rows too) once a quarter of the
  batch has finished, so no step is spent on finished rows.

Sampling draws from a ``torch.Generator`` seeded with the batch's seed, so a batch's samples are
fixed by its seed and its prompts (not by the global RNG). Same distribution as ``generate``, not
the same draws.

``supported(model)`` says where the loop runs; elsewhere ``HFGenerator`` calls ``model.generate``
(encoder-decoder models, models without a standard attention cache, weights sharded across
processes by FSDP or DeepSpeed ZeRO-3 — there every process must join every forward, which
``generate``'s ``synced_gpus`` does —, transformers releases without ``StaticCache(config=...,
max_cache_len=...)``).
"""

from __future__ import annotations

import inspect

import torch

PREFILL_ROWS = 8  # rows per prefill group: the prompts of a group are padded to its longest only
COMPACT_FRACTION = 0.25  # finished rows are dropped once they are this share of the rows in the batch


def left_padded(prompts: list[list[int]], width: int, pad_id: int, device) -> torch.Tensor:
    """(len(prompts), width) ids, each prompt right-aligned (ending where generation starts), pad before it."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    return ids.to(device)


def _base(model):
    """The transformers model itself (a peft model's base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> bool:
    """Whether ``decode`` can run ``model`` (else ``model.generate`` is used)."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return False  # recurrent / custom caches (mamba, xlnet, ...)
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    params = inspect.signature(StaticCache.__init__).parameters
    if not {"config", "max_cache_len"} <= params.keys() or not hasattr(StaticLayer, "lazy_initialization"):
        return False
    return _cache_keyword(base) is not None and not _sharded(base)


def _sharded(model) -> bool:
    """Weights split across processes (FSDP, DeepSpeed ZeRO-3) in a multi-process run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        from transformers.integrations.fsdp import is_fsdp_managed_module
    except ImportError:
        return True  # cannot tell: take the path that is safe either way
    return is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model)


def text_config(model):
    """The config the decoder's cache is built from (a multimodal model's text config), as generate does."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _cache_keyword(model) -> str | None:
    """The forward argument that takes the cache: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the tokens sampling may draw, in the order ``generate`` applies its
    warpers: logits / temperature, the ``top_k`` largest (0: all), then the smallest set of those whose
    probability reaches ``top_p`` (1: all; the most likely token is always kept)."""
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, ids = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p < 1.0:
        values, ids = logits.sort(dim=-1, descending=True)
    else:
        return logits.softmax(-1), torch.arange(vocab, device=logits.device).expand_as(logits)
    probs = values.softmax(-1)
    if top_p < 1.0:
        # generate's TopPLogitsWarper drops a token when the probability of the tokens no more likely than it
        # (itself included) is at most 1 - top_p: here, when the tokens more likely than it reach top_p.
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


def next_tokens(logits: torch.Tensor, params, generator: torch.Generator) -> torch.Tensor:
    """One token per row from fp32 ``logits`` (rows, vocab): arg-max, or a draw from ``warp``."""
    if not params.do_sample:
        return logits.argmax(-1)
    probs, ids = warp(logits, params.temperature, params.top_k, params.top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, choice)[:, 0]


@torch.inference_mode()
def decode(model, prompts: list[list[int]], params, stops: list[int], seed: int, pad_id: int) -> list[list[int]]:
    """The ids sampled for each prompt (token ids), up to and including its first stop id, at most
    ``params.max_new_tokens`` of them. ``model`` must be ``supported``."""
    from transformers import StaticCache

    base = _base(model)
    key = _cache_keyword(base)
    device = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    new = params.max_new_tokens
    out: list[list[int]] = [[] for _ in range(n)]
    if new <= 0:
        return out
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = StaticCache(config=text_config(base), max_cache_len=width + new)
    # The whole attention mask, every step's a prefix of it: prompts left-padded to width, then one column a step.
    mask = torch.zeros(n, width + new, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        mask[i, width - len(p) : width] = 1
    logits = _prefill(model, key, cache, prompts, width, mask, pad_id, device)
    position = mask[:, :width].sum(-1, keepdim=True)  # each row's next position: its prompt length
    rows = torch.arange(n, device=device)  # the prompt index of each row still in the batch
    stop = torch.tensor(stops, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)  # rows that have sampled a stop id
    for step in range(new):
        tokens = next_tokens(logits, params, generator)
        for r, t in zip(rows[~done].tolist(), tokens[~done].tolist()):
            out[r].append(t)
        done = done | torch.isin(tokens, stop)
        if step == new - 1 or bool(done.all()):
            break
        mask[:, width + step] = 1
        if int(done.sum()) >= max(1.0, COMPACT_FRACTION * len(rows)):
            keep = (~done).nonzero()[:, 0]
            rows, tokens, mask, position, done = rows[keep], tokens[keep], mask[keep], position[keep], done[keep]
            _select_rows(cache, keep)
        tokens = tokens.masked_fill(done, pad_id)  # finished rows kept for now are fed padding, never read
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       **{key: cache}).logits[:, -1].float()
        position = position + 1
    return out


def _prefill(model, key: str, cache, prompts, width: int, mask, pad_id: int, device) -> torch.Tensor:
    """Run every prompt through the model into ``cache``; the fp32 logits of each prompt's last token.

    Prompts are taken in length order in groups of PREFILL_ROWS, each padded to its own longest prompt;
    the group's keys and values are copied into the cache rows of its prompts, right-aligned at ``width``.
    Where the cache's layers are not all plain full-attention StaticLayers (sliding windows keep their own
    layout), the batch is prefilled at once into the cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import StaticLayer

    n = len(prompts)
    if n <= PREFILL_ROWS or any(type(layer) is not StaticLayer for layer in cache.layers):
        m = mask[:, :width]
        return model(input_ids=left_padded(prompts, width, pad_id, device), attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                     logits_to_keep=1, **{key: cache}).logits[:, -1].float()
    logits = None
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    for g in range(0, n, PREFILL_ROWS):
        group = order[g : g + PREFILL_ROWS]
        w = max(len(prompts[i]) for i in group)
        m = mask[group, width - w : width]
        part = DynamicCache(config=text_config(model))
        out = model(input_ids=left_padded([prompts[i] for i in group], w, pad_id, device), attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                    logits_to_keep=1, **{key: part}).logits[:, -1].float()
        if logits is None:
            logits = out.new_empty(n, out.shape[-1])
        index = torch.tensor(group, device=device)
        logits[index] = out
        for layer, src in zip(cache.layers, part.layers, strict=True):
            if not layer.is_initialized:  # allocates (n, heads, width + new, head_dim) from the shapes given
                layer.lazy_initialization(src.keys.new_empty(n, *src.keys.shape[1:]),
                                          src.values.new_empty(n, *src.values.shape[1:]))
            layer.keys[index, :, width - w : width] = src.keys
            layer.values[index, :, width - w : width] = src.values
    for layer in cache.layers:
        layer.cumulative_length.fill_(width)
    return logits


def _select_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the cache rows ``keep`` (batch dimension) in every layer."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, keep)
        layer.values = layer.values.index_select(0, keep)
        if hasattr(layer, "batch_size"):
            layer.batch_size = len(keep)
