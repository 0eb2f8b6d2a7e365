"""Per-prompt scores of one model on a verifiable held-out set: what the experiments compare.

For every prompt: the greedy answer's correctness, the number of correct answers among k samples
at temperature T (for sampled pass@1 = c/k and the unbiased pass@k), and the real response's summed
log-prob and token count. Per-prompt values (not only means) let two models be compared on the
same prompts with a paired bootstrap (``sparring.evaluation.metrics``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sparring.evaluation.heldout import EvalSet
from sparring.evaluation.metrics import pass_at_k
from sparring.generation import HFGenerator, SamplingParams, batch_seed
from sparring.logprobs import collate, sequence_logps


@dataclass
class PromptScores:
    greedy: list[float]  # 1.0 where the greedy answer is right
    correct: list[int]  # right answers among the k samples
    k: int
    logp: list[float]  # L(y) of the held-out real response
    tokens: list[int]  # its token count

    def summary(self) -> dict[str, float]:
        """Means over prompts; the log-prob is per token over all tokens (long responses weigh more)."""
        metrics = ["exact_match", *(["pass@1", f"pass@{self.k}"] if self.k else [])]
        out = {m: sum(v := self.per_prompt(m)) / len(v) for m in metrics}
        return {**out, "logps_real_per_token": sum(self.logp) / max(sum(self.tokens), 1)}

    def per_prompt(self, metric: str) -> list[float]:
        if metric == "exact_match":
            return self.greedy
        if metric == "pass@1":
            return [c / self.k for c in self.correct]
        if metric == f"pass@{self.k}":
            return [pass_at_k(self.k, c, self.k) for c in self.correct]
        if metric == "logps_real_per_token":
            return [lp / max(t, 1) for lp, t in zip(self.logp, self.tokens)]
        raise KeyError(metric)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def score_prompts(model, tokenizer, data: EvalSet, check, *, k: int = 8, temperature: float = 1.0,
                  max_new_tokens: int = 32, batch_size: int = 256, seed: int = 0) -> PromptScores:
    """``check(example, answer_text) -> bool``; samples are seeded by (seed, batch), so two models
    are compared on the same random numbers."""
    model.eval()
    device = next(model.parameters()).device
    generator = HFGenerator(model, tokenizer)
    n = len(data.examples)
    order = sorted(range(n), key=lambda i: len(data.prompt_ids[i]))  # less padding
    greedy, correct = [0.0] * n, [0] * n
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        prompts = [data.prompt_ids[i] for i in idx]
        for i, out in zip(idx, generator.generate(prompts, SamplingParams.greedy(max_new_tokens), seed=0)):
            greedy[i] = float(bool(check(data.examples[i], out.text)))
    if k:
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        rows = [i for i in order for _ in range(k)]
        for b, start in enumerate(range(0, len(rows), batch_size)):
            idx = rows[start : start + batch_size]
            outs = generator.generate([data.prompt_ids[i] for i in idx], sampling, seed=batch_seed(seed, "eval", b))
            for i, out in zip(idx, outs):
                correct[i] += bool(check(data.examples[i], out.text))
    logp, tokens = [0.0] * n, [0] * n
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collate([(data.prompt_ids[i], data.response_ids[i]) for i in idx], tokenizer.pad_token_id)
        values = sequence_logps(model, type(batch)(*(t.to(device) for t in batch))).tolist()
        for i, v in zip(idx, values):
            logp[i], tokens[i] = v, len(data.response_ids[i])
    return PromptScores(greedy, correct, k, logp, tokens)
