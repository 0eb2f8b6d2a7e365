"""The generation stage: every prompt once, sorted by length, sharded, written batch by batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sparring.generation.base import Generator, SamplingParams, batch_seed
from sparring.progress import progress
from sparring.state import ChunkStore
from sparring.training.precompute import digest


def generate_responses(
    generator: Generator,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    folder: Path,
    seed: int,
    batch_size: int,
    accelerator=None,
    desc: str = "generate",
) -> list[dict]:
    """One completion per prompt, in prompt order, as {"text", "token_ids", "finished", "num_tokens"}.

    Prompts are sorted by length (less padding), cut into fixed batches, and batch k is done by
    process k % world_size with a seed fixed by k, so results do not depend on where a crash was.
    Each batch is written as one chunk file; finished chunks are skipped on rerun.
    """
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    store = ChunkStore(folder)
    main = accelerator is None or accelerator.is_main_process
    if main:  # chunks drawn with other prompts, batches or settings are recomputed, never mixed in
        layout = {"batch_size": batch_size, "count": len(prompts), "prompts": digest([(p, []) for p in prompts]),
                  "params": dataclasses.asdict(params), "seed": seed}
        store.claim(json.loads(json.dumps(layout)))  # as read back from the manifest (tuples → lists)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    mine = [k for k in range(len(batches)) if k % world == rank and not store.has(k)]
    for k in progress(mine, desc=desc, enabled=main and bool(mine), unit="batch"):
        idx = batches[k]
        completions = generator.generate([prompts[i] for i in idx], params, batch_seed(seed, k))
        store.write(
            k,
            [
                {"index": i, "text": c.text, "token_ids": c.token_ids, "finished": c.finished,
                 "num_tokens": len(c.token_ids)}
                for i, c in zip(idx, completions)
            ],
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    rows = store.read_all(len(batches))
    by_index = {r["index"]: r for r in rows}
    return [by_index[i] for i in range(len(prompts))]
