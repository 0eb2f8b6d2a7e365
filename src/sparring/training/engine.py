"""The step engine every method trains on: set-up and resume, one optimizer step, checkpoints.

``Engine(model, cfg, accelerator, total_steps=…, checkpoints=…)`` prepares the model and optimizer
with accelerate (the schedule is stepped by hand, once per optimizer step, and saved beside
accelerate's state) and loads the newest checkpoint. ``engine.step(work)`` runs one optimizer step:
``work(model)`` does the forward and backward passes of the step's micro-batches (the method's
part) and returns a ``Work``; the engine then clips, takes every process's metrics, tokens and
non-finite / stop flags from one all-reduce (``end_step``), steps or skips (``train.on_nonfinite``)
and returns the step's metrics. ``engine.finish(done, save=…)`` writes a checkpoint when due and
raises ``Preempted`` after a stop signal. Two loops drive it: the epoch loop over precomputed records
(``training.loop.train``: SPIN, T-SPIN, TPAW, SFT) and LSP's online loop (rollouts inside ``work``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparring.config import ConfigError, TrainConfig
from sparring.training.optim import make_optimizer
from sparring.training.optim import make_schedule as schedule_of
from sparring.training.signals import NonFiniteLoss, Preempted, StopRequest

SCHEDULE_FILE = "schedule.pt"
LOOP_FILE = "loop.json"  # the engine's own counters (and the caller's), saved in each checkpoint


@dataclass
class Work:
    """What a step's forward and backward passes on this process left for the engine to reduce."""

    sums: dict[str, float] = field(default_factory=dict)  # metric · share, summed over micro-batches
    shares: dict[str, float] = field(default_factory=dict)  # the share of the step's examples each was measured on
    bad: list[int] = field(default_factory=list)  # positions whose loss was not finite (named in the error)
    tokens: int = 0  # real tokens this process ran through the model
    describe_bad: Callable[[list[int], float], str] | None = None  # (bad, grad_norm) -> what was not finite


@dataclass
class StepEnd:
    metrics: dict[str, float]  # example-weighted means over every process
    grad_norm: float
    nonfinite: bool  # on any process
    stopping: bool  # a stop signal reached any process
    tokens: float = 0.0  # real (unpadded) tokens the step's batches held, over every process


class Engine:
    """One model's optimizer, schedule and checkpoints across the steps of one training phase.

    ``checkpoints`` None: no resume and no checkpoints (a phase too short to need them).
    ``make_schedule(optimizer, total_steps)``: the learning-rate schedule (default: ``train.lr_scheduler``,
    linear warm-up over ``cfg.warmup_ratio``, then linear or cosine decay to 0, as HF's).
    ``where``: how errors and stop messages name the phase (e.g. "iteration 1").
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, accelerator, *, total_steps: int,
                 checkpoints: Path | None, where: str = "training", make_schedule=None):
        self.cfg, self.accelerator, self.total, self.checkpoints, self.where = cfg, accelerator, total_steps, checkpoints, where
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        accelerator.free_memory()  # drop the previous phase's prepared model and optimizer
        # × world undoes DDP's mean over ranks; × DeepSpeed's accumulation steps, the engine's division by them.
        self.loss_scale = accelerator.num_processes * configure_deepspeed(accelerator, cfg)
        optimizer = make_optimizer(model.parameters(), cfg)
        self.scheduler = (make_schedule or (lambda o, n: schedule_of(o, n, cfg)))(optimizer, total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.start = load_latest_checkpoint(accelerator, self.scheduler, checkpoints) if checkpoints else 0
        self.state = loop_state(checkpoints, self.start) if checkpoints else loop_state(None, 0)

    def step(self, work: Callable[[torch.nn.Module], Work], stop: StopRequest, *, done: int) -> StepEnd:
        """Optimizer step ``done`` (1-based): ``work(model)``, then clip, reduce, step or skip.

        Raises ``NonFiniteLoss`` (``train.on_nonfinite=error``) before anything is updated. The
        returned metrics carry ``grad_norm``, ``lr``, ``skipped_steps`` and ``perf/*`` (the step's
        tokens/s over every process, wall time of ``work`` included; the main process's peak memory)."""
        started = time.perf_counter()
        w = work(self.model)
        end = end_step(self.accelerator, self.model, self.cfg, w.sums, w.shares, w.bad, stop, w.tokens)
        if end.nonfinite and self.cfg.on_nonfinite == "error":
            what = (w.describe_bad or (lambda bad, norm: f"a non-finite loss or gradient norm ({norm})"))(w.bad, end.grad_norm)
            raise NonFiniteLoss(nonfinite_message(f"{self.where} step {done} of {self.total}", what,
                                                  self.checkpoints, self.state["checkpoint"]))
        lr = self.scheduler.get_last_lr()[0]
        if end.nonfinite:  # skip_step: the gradients are dropped and the schedule waits
            self.state["skipped_steps"] += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        end.metrics.update({"grad_norm": end.grad_norm, "lr": lr, "skipped_steps": self.state["skipped_steps"],
                            "perf/tokens_per_second": end.tokens / seconds if seconds > 0 else math.nan,
                            "perf/peak_memory_gib": peak_memory_gib(self.accelerator.device)})
        self.state["last_metrics"] = end.metrics
        return end

    def finish(self, done: int, end: StepEnd, *, save: bool, after_save: Callable[[], None] | None = None) -> bool:
        """After step ``done``: a checkpoint when ``save`` or a stop signal came (every process calls
        this), then ``after_save()``; then ``Preempted`` after a signal. Returns whether a checkpoint
        was written."""
        saved = (save or end.stopping) and self.checkpoints is not None
        if saved:
            self.state["checkpoint"] = done
            save_checkpoint(self.accelerator, self.scheduler, self.checkpoints, done, loop_state=self.state)
            if after_save is not None:
                after_save()
        if end.stopping:
            where = checkpoint_dir(self.checkpoints, done) if saved else "none (this phase keeps none)"
            raise Preempted(f"stopped by a signal after {self.where} step {done} of {self.total}; checkpoint "
                            f"{where}; rerun the same command to resume")
        return saved

    def open_logs(self, logger, *, drop: Callable[[dict], bool], offset: int = 0) -> None:
        """Resume the logs with the weights: rows ``drop`` matches that lie past the checkpoint are
        dropped, and the trackers start, TensorBoard purging its events after it (``offset``: the phase's
        first global step − 1)."""
        start = self.start
        logger.drop(lambda r: drop(r) and r["step"] > start)
        logger.open_trackers(purge_step=offset + start + 1)


def configure_deepspeed(accelerator, cfg: TrainConfig) -> int:
    """Give DeepSpeed the loop's batch geometry (it reads it from a prepared dataloader, and there is
    none); returns the accumulation steps its engine divides each micro-batch loss by (1 without it)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return 1
    if cfg.on_nonfinite == "skip_step":
        raise ConfigError("train.on_nonfinite=skip_step cannot work under DeepSpeed: its engine steps inside "
                          "backward, before the loop sees the loss; use error")
    plugin.gradient_accumulation_steps = cfg.grad_accum
    plugin.deepspeed_config.update({
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        "gradient_clipping": cfg.max_grad_norm,  # the engine clips; accelerator.clip_grad_norm_ only reads
    })
    accelerator.gradient_accumulation_steps = cfg.grad_accum  # what prepare checks the config against
    return cfg.grad_accum


def end_step(accelerator, model, cfg: TrainConfig, sums, shares, bad: list[int], stop: StopRequest,
             tokens: int = 0) -> StepEnd:
    """Clip, then one all-reduce of the metric sums, of this process's ``tokens`` and of the non-finite
    and stop flags, so that every process takes the same decision at this step."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # None: DeepSpeed has not computed one
    # fp16's scaler skips overflowing steps itself; otherwise an inf/NaN norm poisons the step.
    nonfinite = bool(bad) or (accelerator.scaler is None and not math.isfinite(grad_norm))
    flags = [float(tokens), float(nonfinite), float(stop.signum)]
    totals = torch.tensor([*sums.values(), *shares.values(), *flags], device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum").tolist()
    metrics = {k: v / w if w > 0 else math.nan for k, v, w in zip(sums, totals, totals[len(sums) : -3])}
    return StepEnd(metrics, grad_norm, nonfinite=totals[-2] > 0, stopping=totals[-1] > 0, tokens=totals[-3])


def add_metrics(sums: dict[str, float], shares: dict[str, float], values: dict[str, Any], weight: float) -> None:
    """Accumulate a micro-batch's metrics, measured on ``weight`` of the step's examples."""
    for key, value in values.items():
        value = float(value)
        sums.setdefault(key, 0.0)  # every key on every process: the reduce sums them by position
        shares.setdefault(key, 0.0)
        # A NaN metric was not measured in this micro-batch (a TPAW player that scores none of
        # its rows): leave it out of the mean instead of poisoning it. The loss is never skipped.
        if weight > 0 and (key == "loss" or not math.isnan(value)):
            sums[key] += value * weight
            shares[key] += weight


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: CUDA's peak allocation on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def nonfinite_message(where: str, what: str, checkpoints: Path | None, checkpoint: int) -> str:
    """What stopped the run (``where``: the step; ``what``: what was not finite, on which rows) and what is kept."""
    kept = f"the last checkpoint, step {checkpoint}, is kept in {checkpoints}" if checkpoint else "no checkpoint yet"
    return (f"{where}: {what}; nothing was saved from this step and {kept}; "
            "train.on_nonfinite=skip_step skips such steps")


def checkpoint_dir(folder: Path, step: int) -> Path:
    """The checkpoint of ``step`` in a checkpoints folder (``RunDir.checkpoints``)."""
    return folder / f"step-{step:08d}"


def load_latest_checkpoint(accelerator, scheduler, folder: Path) -> int:
    """Restore the newest checkpoint under ``folder`` (model, optimizer, RNG, schedule); its step, or 0."""
    done = sorted(folder.glob("step-*[0-9]")) if folder.exists() else []
    if not done:
        return 0
    accelerator.load_state(str(done[-1]))
    scheduler.load_state_dict(torch.load(done[-1] / SCHEDULE_FILE, weights_only=True))
    return int(done[-1].name.split("-")[1])


def loop_state(checkpoints: Path | None, start: int) -> dict[str, Any]:
    """The engine's counters as of checkpoint ``start`` (a checkpoint without them predates them)."""
    state = {"skipped_steps": 0, "last_metrics": {}, "checkpoint": start}
    if checkpoints is None or not start:
        return state
    saved = checkpoint_dir(checkpoints, start) / LOOP_FILE
    return state | json.loads(saved.read_text()) if saved.exists() else state


def save_checkpoint(accelerator, scheduler, folder: Path, step: int, loop_state: dict | None = None) -> None:
    """save_state into a temporary folder, rename it into place, then drop older checkpoints.

    ``loop_state`` (JSON) is the engine's counters, read back on resume."""
    final = checkpoint_dir(folder, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULE_FILE)
        if loop_state is not None:
            (tmp / LOOP_FILE).write_text(json.dumps(loop_state))
        tmp.replace(final)
        for old in folder.glob("step-*[0-9]"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
