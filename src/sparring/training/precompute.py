"""Inference-mode log-prob passes over fixed sequences (opponent / team references, scoring)."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Any

import torch

from sparring.logprobs import collate, sequence_logps
from sparring.progress import progress
from sparring.state import ChunkStore, cache_key


@torch.inference_mode()
def score_sequences(
    model,
    items: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int,
    folder: Path,
    accelerator=None,
    desc: str = "log-probs",
    average: bool = False,
    settings: dict[str, Any] | None = None,
) -> list[float]:
    """L(z) for every (prompt ids, response ids), in order; batches written as chunks (resumable).

    ``average`` scores the per-token mean instead of the sum (``sequence_logps(average=True)``).
    The chunks are keyed by what produced them (``logp_cache_key``: ``settings`` — which model, loaded
    how —, the items' digest, the reduction) and the batch layout: chunks of another key
    (``train.logprob_batch_size`` changed on resume, another model or items) are recomputed, never
    mixed in (``ChunkStore.claim``).
    """
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]) + len(items[i][1]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    store = ChunkStore(folder)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    main = accelerator is None or accelerator.is_main_process
    if main:
        store.claim(logp_cache_key(items, settings or {}, average=average, batch_size=batch_size, count=len(items)))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no rank looks at a chunk before the main one has claimed the store
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = [k for k in range(len(batches)) if k % world == rank and not store.has(k)]
    for k in progress(mine, desc=desc, enabled=main and bool(mine), unit="batch"):
        batch = collate([items[i] for i in batches[k]], pad_id)
        logps = sequence_logps(model, type(batch)(*(t.to(device) for t in batch)), average=average)
        store.write(k, [{"index": i, "logp": v} for i, v in zip(batches[k], logps.double().tolist())])
    model.train(was_training)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    by_index = {r["index"]: r["logp"] for r in store.read_all(len(batches))}
    return [by_index[i] for i in range(len(items))]


def logp_cache_key(items: list[tuple[list[int], list[int]]], settings: dict[str, Any], *, average: bool,
                   **layout: Any) -> dict[str, Any]:
    """The key of a log-prob cache: ``settings`` (the model and how it is loaded), the reduction, the
    sequences' digest and ``layout`` (e.g. the batch size of a chunk store), plus their hash."""
    return cache_key({**settings, "average": average, "items": digest(items), **layout})


def digest(items: list[tuple[list[int], list[int]]]) -> str:
    """sha256 of the (prompt ids, response ids) pairs, in order: which sequences a chunk layout holds."""
    h = hashlib.sha256()
    for prompt, response in items:  # the lengths first, so the boundaries are part of the hash
        h.update(array("q", [len(prompt), len(response), *prompt, *response]).tobytes())
    return h.hexdigest()
