"""Loading models and tokenizers (Hub id or local directory), devices and precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sparring.config import ModelConfig, RunConfig, TrainConfig


def on_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # bf16 matrix products are ~100x slower than fp32 on CPUs; use fp32 there.
        return torch.bfloat16 if on_gpu() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_mixed_precision(train: TrainConfig) -> str:
    if train.mixed_precision == "auto":
        return "bf16" if on_gpu() else "no"
    return train.mixed_precision


def load_tokenizer(cfg: ModelConfig, path: str | Path | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path or cfg.name_or_path),
        revision=None if path else cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, path: str | Path | None = None, *, device: torch.device | str | None = None):
    """A causal LM from ``path`` (a checkpoint of this run) or ``cfg.name_or_path``; dropout off."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": resolve_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if path is None and cfg.revision:
        kwargs["revision"] = cfg.revision
    model = AutoModelForCausalLM.from_pretrained(str(path or cfg.name_or_path), **kwargs)
    disable_dropout(model)
    if device is not None:
        model.to(device)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """SPIN's code turns dropout off in policy and opponent; so do we, for every method."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def ensure_base_model(cfg: RunConfig) -> None:
    """Build the proving ground's SFT model at model.name_or_path when asked to and missing."""
    target = Path(cfg.model.name_or_path)
    if not cfg.model.build_proving_ground or (target / "config.json").exists():
        return
    from sparring.tasks.sft import build_proving_ground

    build_proving_ground(cfg.sft, model_dir=target)


def launched_world_size() -> int:
    """The number of processes torchrun / accelerate launch started (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    # Without cpu=True accelerate only builds a process group on an accelerator: under torchrun on
    # a CPU machine every process would run alone as rank 0 of 1, all writing the same run folder.
    cpu = launched_world_size() > 1 and torch.accelerator.current_accelerator() in (None, torch.device("mps"))
    accelerator = Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(cfg.train))
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(f"launched {launched_world_size()} processes but accelerate joined "
                           f"{accelerator.num_processes} ({accelerator.distributed_type})")
    if accelerator.is_main_process:
        print(f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value.lower()}, {accelerator.device})")
    return accelerator
