"""Optimizers and the learning-rate schedules: linear warm-up, then linear or cosine decay to 0."""

from __future__ import annotations

import math

import torch

from sparring.config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "rmsprop":  # SPIN's choice (torch defaults, as in the HF Trainer)
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """0 → peak over ceil(ratio·total) steps, then linearly to 0 at ``total_steps`` (HF ``linear``)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """0 → peak over ceil(ratio·total) steps, then half a cosine to 0 at ``total_steps`` (HF ``cosine``)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_schedule(optimizer, total_steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_scheduler``'s schedule over ``total_steps`` optimizer steps."""
    schedule = {"linear": linear_schedule, "cosine": cosine_schedule}[cfg.lr_scheduler]
    return schedule(optimizer, total_steps, cfg.warmup_ratio)
