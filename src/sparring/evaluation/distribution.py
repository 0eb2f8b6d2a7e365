"""Distance of a model's answer distribution to a known target: exact (enumerated) and sampled.

For one prompt x with valid answers S and target q = uniform on S (``sparring.tasks.distributions``),
a model π at temperature T (softmax(logits / T) at every token):

- exact, by enumeration: p(y) = π_T(y + end-of-turn | x) for every y ∈ S, the full response scored
  as generation produces it (the same token ids, closing end-of-turn token included). Then
  valid mass m = Σ_{y∈S} p(y); TV = ½ (Σ_{y∈S} |p(y) − 1/|S|| + (1 − m)), the mass off S being at
  distance 1 from a target that has none; entropy H = −Σ p̃ log p̃ of p̃ = p / m (renormalised on
  S), also as H / log |S| (1 = uniform), and the TV of p̃ alone (the shape on S, validity aside);
- sampled: from n responses drawn at temperature T (on a subset of the prompts if asked), validity (share in S), coverage (share of S
  seen) and TV of the empirical distribution (``metrics.distribution_metrics``). A sample is
  the answer y iff its token ids are y's response ids, so sampled and exact metrics agree as n → ∞;
- the finite-sample floor: E TV(p̂_n, q) when the n draws come from q itself, what TV = 0 looks
  like at n samples (``tv_floor``, exact through the binomial marginals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from sparring.data import encode
from sparring.evaluation.heldout import EvalSet
from sparring.evaluation.metrics import distribution_metrics
from sparring.generation import HFGenerator, SamplingParams, batch_seed
from sparring.logprobs import collate, sequence_logps
from sparring.tasks.distributions import support

EXACT = ("tv", "tv_on_support", "valid_mass", "entropy", "entropy_ratio")
SAMPLED = ("sampled_tv", "validity", "coverage", "floor")
METRICS = (*EXACT, *SAMPLED)


def exact_metrics(probs: Sequence[float]) -> dict[str, float]:
    """From p(y) for every y of the support S (|S| = len(probs)), against q = 1/|S|:
    valid_mass m = Σ p; tv = ½ (Σ |p − 1/|S|| + 1 − m); with p̃ = p / m (renormalised on S):
    tv_on_support = ½ Σ |p̃ − 1/|S||, entropy = −Σ p̃ log p̃, entropy_ratio = entropy / log |S|
    (1 for |S| = 1). When m = 0: tv_on_support = 1 − 1/|S| (a point mass's), entropy 0."""
    k = len(probs)
    mass = sum(probs)
    tv = 0.5 * (sum(abs(p - 1.0 / k) for p in probs) + max(0.0, 1.0 - mass))
    if mass > 0:
        shape = [p / mass for p in probs]
        on_support = 0.5 * sum(abs(p - 1.0 / k) for p in shape)
        entropy = -sum(p * math.log(p) for p in shape if p > 0)
    else:
        on_support, entropy = 1.0 - 1.0 / k, 0.0
    return {"tv": tv, "tv_on_support": on_support, "valid_mass": mass, "entropy": entropy,
            "entropy_ratio": entropy / math.log(k) if k > 1 else 1.0}


def tv_floor(n: int, k: int) -> float:
    """E TV(p̂_n, q) for n draws from q = uniform on k answers: by linearity over the answers, each
    count being Binomial(n, 1/k), E TV = (k/2) Σ_x C(n, x) q^x (1 − q)^(n−x) |x/n − q|."""
    q = 1.0 / k
    if k == 1:
        return 0.0
    log_pmf = (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * math.log(q)
               + (n - x) * math.log1p(-q) for x in range(n + 1))  # in logs: C(n, x) overflows a float
    return 0.5 * k * sum(math.exp(lp) * abs(x / n - q) for x, lp in enumerate(log_pmf))


@dataclass
class DistributionScores:
    """Per-prompt metrics of one model at one temperature (lists aligned with the prompts)."""

    temperature: float
    n: int  # samples per prompt (0: exact metrics only)
    support_size: list[int]
    tv: list[float]
    tv_on_support: list[float]
    valid_mass: list[float]
    entropy: list[float]
    entropy_ratio: list[float]
    sampled_tv: list[float]
    validity: list[float]
    coverage: list[float]
    floor: list[float]  # E TV of n draws from the target itself

    def per_prompt(self, metric: str) -> list[float]:
        if metric not in METRICS:
            raise KeyError(metric)
        return getattr(self, metric)

    def summary(self) -> dict[str, float]:
        """Means over prompts of every metric; the sampled ones (only when n > 0) over the prompts
        that were sampled (the others hold NaN)."""
        out = {}
        for m in METRICS if self.n else EXACT:
            values = [v for v in self.per_prompt(m) if v == v]
            out[m] = sum(values) / len(values) if values else math.nan
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def supports_of(data: EvalSet) -> list[list[str]]:
    """The valid answers of every prompt of ``data`` (its last user turn is the query)."""
    out = []
    for e in data.examples:
        valid = support(e.prompt[-1]["content"])
        if not valid:
            raise ValueError(f"not a distribution query: {e.prompt[-1]['content']!r}")
        out.append(valid)
    return out


def support_ids(tokenizer, data: EvalSet, supports: list[list[str]]) -> list[list[list[int]]]:
    """Response ids of every valid answer, end-of-turn included: what generation samples for it."""
    return [[encode(tokenizer, e.prompt, y)[1] for y in valid] for e, valid in zip(data.examples, supports)]


@torch.inference_mode()
def support_probs(model, tokenizer, data: EvalSet, answer_ids: list[list[list[int]]], temperatures: Sequence[float],
                  *, batch_size: int = 512) -> dict[float, list[list[float]]]:
    """{T: per prompt, π_T(y | x) for every y of its support}, by scoring every (x, y) once per T."""
    model.eval()
    device = next(model.parameters()).device
    items = [(i, ids) for i, per in enumerate(answer_ids) for ids in per]
    out = {}
    for temperature in temperatures:
        flat: list[float] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate([(data.prompt_ids[i], ids) for i, ids in chunk], tokenizer.pad_token_id)
            logps = sequence_logps(model, type(batch)(*(t.to(device) for t in batch)), temperature=temperature)
            flat += torch.exp(logps.double()).tolist()
        probs, k = [], 0
        for per in answer_ids:
            probs.append(flat[k : k + len(per)])
            k += len(per)
        out[temperature] = probs
    return out


@torch.inference_mode()
def sample_answers(model, tokenizer, data: EvalSet, answer_ids: list[list[list[int]]], supports: list[list[str]], *,
                   n: int, temperature: float, max_new_tokens: int, batch_size: int = 512,
                   seed: int = 0) -> list[list[str | None]]:
    """n answers per prompt at temperature T: the valid answer whose response ids were sampled, or
    None (anything else, truncated responses included). Batches are seeded by (seed, T, batch), so
    two models are compared on the same random numbers."""
    generator = HFGenerator(model, tokenizer)
    lookup = [{tuple(ids): y for ids, y in zip(per, valid)} for per, valid in zip(answer_ids, supports)]
    rows = [i for i in range(len(data.examples)) for _ in range(n)]
    answers: list[list[str | None]] = [[] for _ in data.examples]
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    for b, start in enumerate(range(0, len(rows), batch_size)):
        idx = rows[start : start + batch_size]
        outs = generator.generate([data.prompt_ids[i] for i in idx], sampling,
                                  seed=batch_seed(seed, "distribution", f"{temperature:g}", b))
        for i, out in zip(idx, outs):
            answers[i].append(lookup[i].get(tuple(out.token_ids)))
    return answers


def score_distribution(model, tokenizer, data: EvalSet, *, temperatures: Sequence[float], n: int,
                       max_new_tokens: int, batch_size: int = 512, seed: int = 0,
                       sample_prompts: int | None = None,
                       answer_ids: list[list[list[int]]] | None = None) -> dict[float, DistributionScores]:
    """Exact per-prompt metrics of ``model`` at every temperature, and (n > 0) sampled ones on the
    first ``sample_prompts`` prompts (None: all; the others get NaN). ``answer_ids``: ``support_ids``
    of ``data`` when already computed (they depend on the tokenizer only)."""
    supports = supports_of(data)
    answer_ids = support_ids(tokenizer, data, supports) if answer_ids is None else answer_ids
    exact = support_probs(model, tokenizer, data, answer_ids, temperatures, batch_size=batch_size)
    sizes = [len(s) for s in supports]
    k = len(sizes) if sample_prompts is None else min(sample_prompts, len(sizes))
    sampled_set = EvalSet(data.examples[:k], data.prompt_ids[:k], data.response_ids[:k])
    floors = [tv_floor(n, size) if n and i < k else math.nan for i, size in enumerate(sizes)]
    out = {}
    for temperature in temperatures:
        rows = [exact_metrics(p) for p in exact[temperature]]
        sampled = [{"tv": math.nan, "validity": math.nan, "coverage": math.nan}] * len(sizes)
        if n:
            answers = sample_answers(model, tokenizer, sampled_set, answer_ids[:k], supports[:k], n=n,
                                     temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     seed=seed)
            sampled[:k] = [distribution_metrics(a, {y: 1.0 / len(s) for y in s}) for a, s in zip(answers, supports)]
        out[temperature] = DistributionScores(
            temperature=temperature, n=n, support_size=sizes,
            **{m: [r[m] for r in rows] for m in EXACT},
            sampled_tv=[r["tv"] for r in sampled], validity=[r["validity"] for r in sampled],
            coverage=[r["coverage"] for r in sampled], floor=floors,
        )
    return out
