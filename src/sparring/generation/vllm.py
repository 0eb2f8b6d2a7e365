"""vLLM backend (``generation.backend: vllm``, extra ``sparring[vllm]``), for GPUs.

vLLM loads the checkpoint from disk (the iterate θ_t saved by the previous iteration), takes the
same rendered prompt token ids as the Hugging Face backend and the same per-batch seeds, in the
precision the HF model has (``model.dtype``) and, for the base model, at ``model.revision``. The SPIN
maintainers note that vLLM samples differ from HF generation; use ``hf`` to reproduce the paper.
"""

from __future__ import annotations

from pathlib import Path

from sparring.config import ModelConfig
from sparring.data.chat import stop_token_ids
from sparring.generation.base import Completion, SamplingParams, complete


class VLLMGenerator:
    @classmethod
    def for_model(cls, model: ModelConfig, path: str | Path | None, tokenizer, *,
                  gpu_memory_utilization: float = 0.5) -> VLLMGenerator:
        """θ_t as the run's ``model:`` settings load it: ``path`` (a checkpoint of the run) or, for None,
        the base ``model.name_or_path`` at ``model.revision``; in ``model.dtype`` resolved as for the HF
        model (auto: bf16 on GPU). ``model.attn_implementation`` is HF's: vLLM picks its own kernels."""
        from sparring.modeling import resolve_dtype

        dtype = str(resolve_dtype(model.dtype)).removeprefix("torch.")
        return cls(path or model.name_or_path, tokenizer, dtype=dtype, revision=None if path else model.revision,
                   gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=model.trust_remote_code)

    def __init__(self, path: str | Path, tokenizer, *, dtype: str = "auto", revision: str | None = None,
                 gpu_memory_utilization: float = 0.5, trust_remote_code: bool = False):
        try:
            from vllm import LLM
        except ImportError as err:  # pragma: no cover - needs the extra
            raise ImportError("generation.backend=vllm needs vLLM: pip install 'sparring[vllm]'") from err
        from transformers import GenerationConfig

        self.tokenizer = tokenizer
        try:  # the end ids the checkpoint declares (Qwen / Llama-3 chat models list end-of-turn there)
            self.declared_eos = GenerationConfig.from_pretrained(str(path), revision=revision or "main").eos_token_id
        except OSError:
            self.declared_eos = None
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=dtype, revision=revision, tokenizer_revision=revision,
                       trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        stops = stop_token_ids(self.tokenizer, self.declared_eos, params.stop_token_ids)
        sampling = VLLMSampling(
            n=1,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p if params.do_sample else 1.0,
            top_k=params.top_k if (params.do_sample and params.top_k) else -1,
            max_tokens=params.max_new_tokens,
            seed=seed,
            stop_token_ids=stops,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
        # vLLM's token_ids end with the stop id that finished the sequence, as the HF backend's do.
        return [complete(self.tokenizer, list(out.outputs[0].token_ids), stops) for out in outputs]

    def close(self) -> None:
        """Free the GPU memory vLLM holds before training starts."""
        import gc

        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
