"""Loading models and tokenizers (Hub id or local directory), devices and precision."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from sparring.config import ConfigError, ModelConfig, PeftConfig, RunConfig, TrainConfig


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


def load_model(cfg: ModelConfig, path: str | Path | None = None, *, device: torch.device | str | None = None,
               load_in_4bit: bool = False):
    """A causal LM from ``path`` (a checkpoint of this run) or ``cfg.name_or_path``; dropout off.

    ``load_in_4bit``: NF4 weights (QLoRA), placed on ``device`` as they load (they cannot be moved)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": resolve_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if path is None and cfg.revision:
        kwargs["revision"] = cfg.revision
    if load_in_4bit:
        check_4bit()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": torch.device(device) if device is not None else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(path or cfg.name_or_path), **kwargs)
    disable_dropout(model)
    if device is not None and not load_in_4bit:
        model.to(device)
    return model


def check_peft(peft: PeftConfig) -> None:
    """Refuse LoRA / QLoRA settings this machine cannot run, before any model is loaded."""
    if not peft.on:
        return
    _import_peft()
    if peft.load_in_4bit:
        check_4bit()


def check_4bit() -> None:
    if not on_gpu():
        raise ConfigError("peft.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers do not run "
                          "on this machine's CPU; set peft.load_in_4bit=false to train LoRA on full weights")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("peft.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("the peft: section (LoRA) needs peft: pip install 'sparring[peft]'") from None
    return peft


def add_adapters(model, peft: PeftConfig, *, seed: int, gradient_checkpointing: bool = False):
    """``model`` with fresh LoRA adapters; only they train, ``model``'s own weights are frozen.

    B starts at 0, so the result computes exactly what ``model`` does. A is drawn from ``seed`` (CPU,
    where peft initialises), so a rerun starts from the same adapters."""
    lib = _import_peft()
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    config = lib.LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                            target_modules=list(peft.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lib.get_peft_model(model, config)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merge_adapters(model, cfg: ModelConfig, base_path: str | Path | None = None):
    """The plain model a PeftModel computes, its adapters merged into the weights.

    Full-precision weights are merged into in place (no second copy). A 4-bit base is left as it is:
    the adapters go into a full-precision copy of the base (``base_path``) loaded on the CPU, so the
    saved model carries no 4-bit rounding into the next iteration."""
    generation_config = model.generation_config  # peft's generate leaves the sampling one on the base
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        config = copy.deepcopy(model.peft_config["default"])
        full = _import_peft().get_peft_model(load_model(cfg, base_path, device="cpu"), config)
        set_peft_model_state_dict(full, adapters)
        model = full
    merged = model.merge_and_unload()
    merged.generation_config = generation_config
    return merged


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
    """Build the proving ground's SFT model at model.name_or_path when the config asks for it
    (model.build_proving_ground) and it is missing. The CLI calls this, before the run starts; a
    multi-process launch is refused then, before any process writes anything."""
    target = Path(cfg.model.name_or_path)
    if not cfg.model.build_proving_ground or (target / "config.json").exists():
        return
    if launched_world_size() > 1:
        raise ConfigError(f"the proving ground is missing at {target}: build it first in one process "
                          "(`sparring sft` with the same config), then launch the multi-process run")
    from sparring.state import RunDir
    from sparring.tasks.sft import build_proving_ground

    RunDir(cfg.output_dir).lock()  # a run held by another process is refused before minutes of building
    build_proving_ground(cfg.sft, model_dir=target)


def launched_world_size() -> int:
    """The number of processes torchrun / accelerate launch started (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: RunConfig):
    """The run's Accelerator: precision, processes, and the trackers of ``logging.report_to`` with the
    run directory as project (TensorBoard in RUN/tb; started by ``training.trackers.Trackers``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sparring.state import RunDir
    from sparring.training.trackers import log_with

    # Without cpu=True accelerate only builds a process group on an accelerator: under torchrun on
    # a CPU machine every process would run alone as rank 0 of 1, all writing the same run folder.
    cpu = launched_world_size() > 1 and torch.accelerator.current_accelerator() in (None, torch.device("mps"))
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(RunDir(cfg.output_dir).tensorboard))
    accelerator = Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(cfg.train),
                              log_with=log_with(cfg.logging) or None, project_config=project)
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(f"launched {launched_world_size()} processes but accelerate joined "
                           f"{accelerator.num_processes} ({accelerator.distributed_type})")
    if accelerator.is_main_process:
        print(f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value.lower()}, {accelerator.device})")
    return accelerator
