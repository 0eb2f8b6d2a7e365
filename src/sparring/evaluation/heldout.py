"""Held-out evaluation of one model.

- ``exact_match``: greedy answers checked by the proving ground's program (``eval.verifier``);
- ``logps_real_per_token``: mean per-token log-prob of the held-out real responses (any data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparring.config import EvalConfig
from sparring.data import encode, load_examples, load_rows
from sparring.data.records import Example
from sparring.generation import HFGenerator, SamplingParams
from sparring.logprobs import collate, sequence_logps


@dataclass
class EvalSet:
    examples: list[Example]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]


def load_eval_set(cfg: EvalConfig, tokenizer, max_length: int) -> EvalSet | None:
    if not cfg.source:
        return None
    examples, _ = load_examples(load_rows(cfg.source, cfg.split), source=cfg.source)
    examples = examples[: cfg.num_examples] if cfg.num_examples else examples
    encoded = [encode(tokenizer, e.prompt, e.real, max_length=max_length) for e in examples]
    return EvalSet(examples, [p for p, _ in encoded], [r for _, r in encoded])


@torch.inference_mode()
def evaluate(model, tokenizer, data: EvalSet, cfg: EvalConfig) -> dict[str, float]:
    from sparring.tasks import check

    model.eval()
    device = next(model.parameters()).device
    results: dict[str, float] = {}
    if cfg.verifier == "proving_ground":
        generator = HFGenerator(model, tokenizer)
        correct = 0
        order = sorted(range(len(data.examples)), key=lambda i: len(data.prompt_ids[i]))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            outs = generator.generate(
                [data.prompt_ids[i] for i in idx], SamplingParams.greedy(cfg.max_new_tokens), seed=0
            )
            for i, out in zip(idx, outs):
                query = data.examples[i].prompt[-1]["content"]
                correct += bool(check(query, out.text))
        results["exact_match"] = correct / max(len(data.examples), 1)
    total, tokens = 0.0, 0
    for start in range(0, len(data.examples), cfg.batch_size):
        pairs = list(zip(data.prompt_ids[start : start + cfg.batch_size], data.response_ids[start : start + cfg.batch_size]))
        batch = collate(pairs, tokenizer.pad_token_id)
        batch = type(batch)(*(t.to(device) for t in batch))
        total += sequence_logps(model, batch).sum().item()
        tokens += sum(len(r) for _, r in pairs)
    results["logps_real_per_token"] = total / max(tokens, 1)
    return results
