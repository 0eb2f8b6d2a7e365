"""Held-out evaluation of one model, by every process of a run (each takes a share of the batches).

- with ``eval.verifier`` (a verifier of ``rewards.registry`` or a user function): the mean score of
  the greedy answers to each held-out prompt's last user turn, as the verifier's metric
  (``exact_match`` for the proving ground; an answer the verifier cannot judge scores 0);
- ``logps_real_per_token``: mean per-token log-prob of the held-out real responses (any data);
- with ``eval.sample_prompts`` K (``evaluate_with_answers``): the greedy answers to the first K
  held-out prompts, the same prompts for every model of a run (the report shows them side by side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparring.config import EvalConfig
from sparring.data import encode, load_examples, load_rows
from sparring.data.records import Example
from sparring.generation import Completion, HFGenerator, SamplingParams
from sparring.logprobs import collate, sequence_logps
from sparring.rewards.registry import Verifier, verifier


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


def shard(batches: list[list[int]], rank: int, world: int) -> list[tuple[int | None, list[int]]]:
    """(k, batch) for the batches k ≡ rank (mod world), then stand-ins (k None, results dropped) until
    every process has as many: under ZeRO-3 / FSDP each forward gathers weights from all of them."""
    if not batches:
        return []
    mine: list[tuple[int | None, list[int]]] = [(k, b) for k, b in enumerate(batches) if k % world == rank]
    rounds = -(-len(batches) // world)
    return mine + [(None, batches[0])] * (rounds - len(mine))


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def evaluate(model, tokenizer, data: EvalSet, cfg: EvalConfig, accelerator=None) -> dict[str, float]:
    """Scores of ``model`` (``evaluate_with_answers`` without sample answers)."""
    return evaluate_with_answers(model, tokenizer, data, cfg, accelerator, samples=0)[0]


@torch.inference_mode()
def evaluate_with_answers(model, tokenizer, data: EvalSet, cfg: EvalConfig, accelerator=None, *,
                          samples: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Scores of ``model``, and its greedy answers to the first ``samples`` held-out prompts:
    {"row", "prompt", "real", "answer", "score" (with a verifier)} in prompt order.

    With an ``accelerator`` every process takes a share of the batches and all return the same
    scores and answers. Batches are cut as in one process, so the numbers do not depend on the
    number of processes."""
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    n = len(data.examples)
    samples = min(samples, n)
    judge = verifier(cfg.verifier) if cfg.verifier not in (None, "none") else None
    generator = HFGenerator(model, tokenizer)
    # A verifier judges every answer; without one only the sample prompts are answered.
    rows = [{"index": i, "answer": text} for i, text in greedy_answers(
        generator, data.prompt_ids, range(n if judge else samples), cfg, rank, world)]
    if judge:
        rows = verified_scores(data, rows, judge)
    for r in rows:
        if r["index"] >= samples:  # scored, not shown: only the score travels
            del r["answer"]
    rows += real_logps(model, tokenizer, data, cfg, rank, world)
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    logps = sorted((r for r in rows if "logp" in r), key=lambda r: r["batch"])
    results: dict[str, float] = {}
    if judge:
        scores = sorted((r for r in rows if "score" in r), key=lambda r: r["index"])
        results[judge.metric] = sum(r["score"] for r in scores) / max(n, 1)
    # Summed in batch order, as one process would: the same float whatever the world size.
    results["logps_real_per_token"] = sum(r["logp"] for r in logps) / max(sum(r["tokens"] for r in logps), 1)
    answered = sorted((r for r in rows if "answer" in r), key=lambda r: r["index"])
    return results, [answer_row(data.examples[r["index"]], r) for r in answered]


def answer_row(example: Example, row: dict) -> dict:
    """One line of a model's sample answers: the held-out row, its prompt and real response, the answer."""
    score = {"score": row["score"]} if "score" in row else {}
    return {"row": example.row, "prompt": example.prompt, "real": example.real, "answer": row["answer"], **score}


def greedy_answers(generator, prompt_ids: list[list[int]], indices, cfg: EvalConfig, rank: int = 0,
                   world: int = 1) -> list[tuple[int, str]]:
    """(index, greedy answer) for this process's share of the prompts ``indices``, in length-sorted batches
    of ``cfg.batch_size`` with at most ``cfg.max_new_tokens`` new tokens."""
    return [(i, out.text) for i, out in completions(generator, prompt_ids, indices, cfg.batch_size,
                                                    SamplingParams.greedy(cfg.max_new_tokens), rank, world)]


def completions(generator, prompt_ids: list[list[int]], indices, batch_size: int, params: SamplingParams,
                rank: int = 0, world: int = 1, seed: int = 0) -> list[tuple[int, Completion]]:
    """(index, Completion) for this process's share of the prompts ``indices`` (length-sorted batches,
    each process as many batches as the others: see ``shard``)."""
    order = sorted(indices, key=lambda i: len(prompt_ids[i]))
    out = []
    for k, idx in shard(batches_of(order, batch_size), rank, world):
        batch = generator.generate([prompt_ids[i] for i in idx], params, seed=seed)
        if k is not None:
            out += list(zip(idx, batch, strict=True))
    return out


def query_of(example: Example) -> str:
    """What the verifier is asked about: the prompt's last user turn (a system turn or earlier
    exchange before it is context, not the query)."""
    turns = [t["content"] for t in example.prompt if t.get("role") == "user"]
    if not turns:
        raise ValueError(f"held-out row {example.row} has no user turn for eval.verifier to judge")
    return turns[-1]


def verified_scores(data: EvalSet, rows: list[dict], judge: Verifier) -> list[dict]:
    """``rows`` ({"index", "answer"}) with the verifier's "score"; an answer it cannot judge (valid False) scores 0."""
    if not rows:  # a process with no share of the prompts
        return rows
    batch = judge.reward([query_of(data.examples[r["index"]]) for r in rows], [r["answer"] for r in rows])
    return [{**r, "score": score if ok else 0.0} for r, score, ok in zip(rows, batch.scores, batch.valid, strict=True)]


def real_logps(model, tokenizer, data: EvalSet, cfg: EvalConfig, rank: int, world: int) -> list[dict]:
    """{"batch", "logp", "tokens"} per batch of this process's share: summed log-probs of the real responses."""
    device = next(model.parameters()).device
    rows = []
    for k, idx in shard(batches_of(list(range(len(data.examples))), cfg.batch_size), rank, world):
        batch = collate([(data.prompt_ids[i], data.response_ids[i]) for i in idx], tokenizer.pad_token_id)
        total = sequence_logps(model, type(batch)(*(t.to(device) for t in batch))).sum().item()
        if k is not None:
            rows.append({"batch": k, "logp": total, "tokens": sum(len(data.response_ids[i]) for i in idx)})
    return rows
