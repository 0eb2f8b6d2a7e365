"""Hugging Face ``generate`` backend: left padding, KV cache, batch-level seeds.

Generation stops at every end id: the EOS list of the model's own generation_config (Qwen and
Llama-3 chat models list their end-of-turn token there), the template's end-of-turn token, the
tokenizer's EOS and ``SamplingParams.stop_token_ids``.
"""

from __future__ import annotations

import torch

from sparring.data.chat import stop_token_ids
from sparring.generation.base import Completion, SamplingParams, complete


class HFGenerator:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        from transformers import GenerationConfig

        tok = self.tokenizer
        stops = stop_token_ids(tok, self.model.generation_config.eos_token_id, params.stop_token_ids)
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        # A complete GenerationConfig, so nothing comes from the checkpoint's generation_config.json.
        sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)  # 0 = off; None would become 50
        gen_config = GenerationConfig(
            do_sample=params.do_sample,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops,
            use_cache=True,
            **(sampling if params.do_sample else {}),
        )
        was_training, saved = self.model.training, self.model.generation_config
        # generate() fills settings left at library defaults from the model's generation_config, so the
        # model's own config is swapped for ours while generating.
        self.model.generation_config = gen_config
        self.model.eval()
        torch.manual_seed(seed)
        try:
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
            )
        finally:
            self.model.generation_config = saved
            self.model.train(was_training)
        return [complete(tok, row, stops) for row in out[:, width:].tolist()]
