"""Preference reward models: a sequence classifier with one output scores a rendered conversation.

The LSP paper (Kuba et al. 2025, §5) uses Skywork-Reward-V2-Llama-3.2-3B; any Hugging Face
``AutoModelForSequenceClassification`` with ``num_labels == 1`` works. ``transformers`` is imported
when a model is built, not when this module is imported.
"""

from __future__ import annotations

import math

import torch

from sparring.rewards.base import RewardBatch, check_pairs, score_one


class HFRewardModel:
    """Score (query, answer) pairs with logit[0] of a Hub or local sequence-classification model.

    Each pair is rendered as the two-turn conversation [user: query, assistant: answer] with the
    tokenizer's chat template, or as ``query + "\\n" + answer`` when the tokenizer has none. A BOS
    token the template already wrote is stripped before tokenising, so it is not doubled (Skywork's
    recipe). Inputs longer than ``max_length`` tokens are truncated; ``num_truncated`` counts them.
    Batches are right-padded; the model must pool the last non-pad token (Llama-style) or the first
    token (BERT-style), so the pad token must not occur inside the text.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{name_or_path} has num_labels={self.model.config.num_labels}; "
                "a reward model needs exactly 1"
            )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_truncated = 0

    def render(self, query: str, answer: str) -> str:
        """The text the model scores for one pair."""
        if not getattr(self.tokenizer, "chat_template", None):
            return query + "\n" + answer
        conversation = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    @torch.inference_mode()
    def __call__(self, queries: list[str], answers: list[str]) -> RewardBatch:
        check_pairs(queries, answers)
        texts = [self.render(q, a) for q, a in zip(queries, answers, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            ids = self.tokenizer(chunk)["input_ids"]
            self.num_truncated += sum(len(row) > self.max_length for row in ids)
            ids = [row[: self.max_length] for row in ids]
            enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits  # (B, 1)
            scores.extend(logits[:, 0].double().tolist())
        for i, s in enumerate(scores):
            if not math.isfinite(s):
                raise ValueError(f"reward model returned {s} for query={queries[i]!r}, answer={answers[i]!r}")
        return RewardBatch(scores, [True] * len(scores))

    def score(self, query: str, answer: str) -> float:
        return score_one(self, query, answer)
