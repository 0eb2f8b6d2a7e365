"""The Hugging Face backend: sparring's decoding loop (``generation.decode``), ``model.generate`` where
that loop does not apply; left padding, KV cache, batch-level seeds.

Generation stops at every end id: the EOS list of the model's own generation_config (Qwen and
Llama-3 chat models list their end-of-turn token there), the template's end-of-turn token, the
tokenizer's EOS and ``SamplingParams.stop_token_ids``.
"""

from __future__ import annotations

import torch

from sparring.data.chat import stop_token_ids
from sparring.generation import decode
from sparring.generation.base import Completion, SamplingParams, complete


class HFGenerator:
    """Completions of a Hugging Face causal LM. ``loop``: "auto" (sparring's loop where ``decode.supported``,
    else ``model.generate``), "sparring" or "generate" (transformers' ``model.generate``, always)."""

    def __init__(self, model, tokenizer, loop: str = "auto"):
        if loop not in ("auto", "sparring", "generate"):
            raise ValueError(f"loop must be auto, sparring or generate, not {loop!r}")
        if loop == "sparring" and not decode.supported(model):
            raise ValueError(f"sparring's decoding loop does not run {type(model).__name__} here (see "
                             "sparring.generation.decode.supported); use loop='generate'")
        self.model = model
        self.tokenizer = tokenizer
        self.loop = loop
        self.ours = loop == "sparring" or (loop == "auto" and decode.supported(model))  # else model.generate

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        tok = self.tokenizer
        stops = stop_token_ids(tok, self.model.generation_config.eos_token_id, params.stop_token_ids)
        if not self.ours:
            rows = self._library_generate(prompts, params, seed, stops)
        else:
            was_training = self.model.training
            self.model.eval()
            try:
                rows = decode.decode(self.model, prompts, params, stops, seed, tok.pad_token_id)
            finally:
                self.model.train(was_training)
        return [complete(tok, row, stops) for row in rows]

    def _library_generate(self, prompts: list[list[int]], params: SamplingParams, seed: int,
                          stops: list[int]) -> list[list[int]]:
        """The sampled ids of each prompt (padding after a stop id included) from ``model.generate``."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = decode.left_padded(prompts, width, tok.pad_token_id, "cpu")
        mask = decode.left_padded([[1] * len(p) for p in prompts], width, 0, "cpu")
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
        return out[:, width:].tolist()
