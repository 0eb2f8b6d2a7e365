"""A bigram "LM" for log-prob tests: the logits at position t depend only on token t (a fixed table),
so expected log-probs can be computed by hand and padding cannot leak into them."""

from __future__ import annotations

import torch


class TableModel(torch.nn.Module):
    def __init__(self, vocab: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=None):
        logits = self.table[input_ids]  # (B, T, V); a (B, T) bool logits_to_keep flattens, as in transformers
        return type("Out", (), {"logits": logits if logits_to_keep is None else logits[logits_to_keep]})()
