"""The shared training loop on accelerate, fed by composition (a collate function and a loss step).

Every method calls ``train(...)`` with its records, a ``collate(records) -> batch`` and a
``loss_step(model, batch) -> LossOutput``. The loop owns the data order (a seeded permutation per
epoch), gradient accumulation, clipping, the optimizer and schedule, logging and resumable
checkpoints: every ``save_steps`` optimizer steps the model, optimizer, scheduler and RNG states are
saved with ``accelerator.save_state``; a rerun loads the newest one and skips the steps it covers.

SIGTERM or SIGUSR1 during training (a scheduler's preemption notice) ends the current step, writes a
checkpoint and raises ``Preempted`` (the CLI exits with ``EXIT_PREEMPTED``). A non-finite loss or
gradient norm raises ``NonFiniteLoss`` or skips the step (``train.on_nonfinite``). Every process
takes both decisions from one all-reduce per step, so all stop or skip at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparring.config import ConfigError, TrainConfig
from sparring.losses import LossOutput
from sparring.progress import progress
from sparring.training.metrics import MetricsLogger
from sparring.training.optim import linear_schedule, make_optimizer

SCHEDULE_FILE = "schedule.pt"
LOOP_FILE = "loop.json"  # the loop's own counters, saved in each checkpoint
# sysexits' EX_TEMPFAIL: "try again later" — the run stopped cleanly and its rerun resumes it.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; rerunning the command resumes it."""


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was NaN/inf (train.on_nonfinite=error); nothing was saved from it."""


class StopRequest:
    """Notes SIGTERM/SIGUSR1 while training, so the loop stops between steps, never inside one.

    Handlers can only be set from the main thread; elsewhere the signals keep their old meaning.
    The previous handlers come back when the block ends.
    """

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.signum = signum


@dataclass
class TrainResult:
    steps: int
    last_metrics: dict[str, float]
    model: Any = None  # the model as prepared by accelerate (DDP/FSDP/DeepSpeed wrapper): save from this


def plan_steps(n: int, cfg: TrainConfig, world: int) -> list[list[list[int]]]:
    """Optimizer steps → micro-batches → record indices (global, before splitting across processes)."""
    micro = cfg.batch_size * world
    steps = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        micros = [perm[i : i + micro] for i in range(0, n, micro)]
        steps += [micros[i : i + cfg.grad_accum] for i in range(0, len(micros), cfg.grad_accum)]
    return steps


@dataclass
class MicroBatch:
    indices: list[int]  # the records this process runs
    count: int  # how many of them are its share; 0 for a stand-in record run only to join the all-reduce


def shard_step(step: list[list[int]], rank: int, world: int) -> list[MicroBatch]:
    """This process's share of each micro-batch. A process left without examples still runs one
    record (DDP needs every rank in each gradient all-reduce) that counts for nothing."""
    return [MicroBatch(m[rank::world] or m[:1], len(m[rank::world])) for m in step]


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


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    return batch


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


@contextlib.contextmanager
def gradient_sync(accelerator, model, *, last: bool):
    """One micro-batch of a step: no DDP all-reduce before the last one, and no DeepSpeed engine step
    (no_sync does nothing there): accelerator.backward passes sync_gradients on as the boundary."""
    accelerator.sync_gradients = last
    try:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def load_latest_checkpoint(accelerator, scheduler, folder: Path) -> int:
    """Restore the newest checkpoint under ``folder`` (model, optimizer, RNG, schedule); its step, or 0."""
    done = sorted(folder.glob("step-*[0-9]")) if folder.exists() else []
    if not done:
        return 0
    accelerator.load_state(str(done[-1]))
    scheduler.load_state_dict(torch.load(done[-1] / SCHEDULE_FILE, weights_only=True))
    return int(done[-1].name.split("-")[1])


def train(
    model: torch.nn.Module,
    records: list[Any],
    *,
    collate: Callable[[list[Any]], Any],
    loss_step: Callable[[torch.nn.Module, Any], LossOutput],
    cfg: TrainConfig,
    accelerator,
    folder: Path,
    logger: MetricsLogger,
    log_fields: dict[str, Any],
    global_step_offset: int = 0,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``records``; resumes from the newest checkpoint under ``folder``."""
    if not records:
        raise ValueError("no training records")
    world = accelerator.num_processes
    plan = plan_steps(len(records), cfg, world)
    total = len(plan)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    accelerator.free_memory()  # drop the previous iteration's prepared model and optimizer
    # × world undoes DDP's mean over ranks; × DeepSpeed's accumulation steps, the engine's division by them.
    loss_scale = world * configure_deepspeed(accelerator, cfg)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = linear_schedule(optimizer, total, cfg.warmup_ratio)
    # The scheduler is stepped by hand once per optimizer step (accelerate would step it per process)
    # and saved beside accelerate's state.
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpoints = folder / "checkpoints"
    start = load_latest_checkpoint(accelerator, scheduler, checkpoints)
    state = loop_state(checkpoints, start)
    logger.drop(lambda r: r.get("kind") == "train" and _same(r, log_fields) and r["step"] > start)
    logger.open_tensorboard(purge_step=global_step_offset + start + 1)
    where = " ".join(f"{k} {v}" for k, v in log_fields.items()) or "training"
    bar = progress(total=total, initial=start, desc=desc, enabled=accelerator.is_main_process, unit="step")
    try:
        with StopRequest() as stop:
            for step in range(start, total):
                done = step + 1
                started = time.perf_counter()
                sums, shares, bad, tokens = run_micro_batches(model, records, plan[step], collate, loss_step,
                                                              accelerator, loss_scale=loss_scale)
                end = end_step(accelerator, model, cfg, sums, shares, bad, stop, tokens)
                if end.nonfinite and cfg.on_nonfinite == "error":
                    what = nonfinite_records(accelerator, bad, plan[step], end.grad_norm)
                    raise NonFiniteLoss(nonfinite_message(f"{where} step {done} of {total}", what, checkpoints,
                                                          state["checkpoint"]))
                lr = scheduler.get_last_lr()[0]
                if end.nonfinite:  # skip_step: the gradients are dropped and the schedule waits
                    state["skipped_steps"] += 1
                else:
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{end.metrics['loss']:.4f}")
                seconds = time.perf_counter() - started
                state["last_metrics"] = {**end.metrics, "grad_norm": end.grad_norm, "lr": lr,
                                         "skipped_steps": state["skipped_steps"],
                                         # throughput of this step, all processes; peak memory of the main one
                                         "perf/tokens_per_second": end.tokens / seconds if seconds > 0 else math.nan,
                                         "perf/peak_memory_gib": peak_memory_gib(accelerator.device)}
                if done % cfg.logging_steps == 0 or done == total or end.stopping:
                    row = {"kind": "train", **log_fields, "step": done, "epoch": round(done / total * cfg.epochs, 4)}
                    logger.log({**row, **state["last_metrics"]}, step=global_step_offset + done)
                if (done % cfg.save_steps == 0 and done < total) or end.stopping:
                    state["checkpoint"] = done
                    save_checkpoint(accelerator, scheduler, checkpoints, done, loop_state=state)
                if end.stopping:
                    raise Preempted(f"stopped by a signal after {where} step {done} of {total}; checkpoint "
                                    f"{checkpoint_dir(checkpoints, done)}; rerun the same command to resume")
    finally:
        bar.close()
        logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(steps=total, last_metrics=state["last_metrics"], model=model)


def loop_state(checkpoints: Path, start: int) -> dict[str, Any]:
    """The loop's counters as of checkpoint ``start`` (a checkpoint without them predates them)."""
    state = {"skipped_steps": 0, "last_metrics": {}, "checkpoint": start}
    saved = checkpoint_dir(checkpoints, start) / LOOP_FILE
    return state | json.loads(saved.read_text()) if start and saved.exists() else state


@dataclass
class StepEnd:
    metrics: dict[str, float]  # example-weighted means over every process
    grad_norm: float
    nonfinite: bool  # on any process
    stopping: bool  # a stop signal reached any process
    tokens: float = 0.0  # real (unpadded) tokens the step's batches held, over every process


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


def batch_tokens(batch: Any) -> int:
    """Real (unpadded) tokens of a collated batch: the sum of every ``attention_mask`` it holds."""
    if not (isinstance(batch, tuple) and hasattr(batch, "_fields")):
        return 0
    return sum(int(value.sum()) if name == "attention_mask" and isinstance(value, torch.Tensor) else batch_tokens(value)
               for name, value in zip(batch._fields, batch))


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: CUDA's peak allocation on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def run_micro_batches(model, records, step: list[list[int]], collate, loss_step, accelerator, *, loss_scale: int):
    """Forward and backward over this process's share of one optimizer step.

    Returns the step's metric sums and shares (example-weighted), the records whose loss was not
    finite and the real tokens this process ran."""
    micro_batches = shard_step(step, accelerator.process_index, accelerator.num_processes)
    step_total = sum(len(m) for m in step)
    sums: dict[str, float] = {}
    shares: dict[str, float] = {}  # the share of the step's examples each metric was measured on
    bad: list[int] = []
    tokens = 0
    for j, micro in enumerate(micro_batches):
        batch = collate([records[i] for i in micro.indices])
        # counted on the collated (host) batch: no device sync; a stand-in batch (count 0) does no real work
        tokens += batch_tokens(batch) if micro.count else 0
        batch = to_device(batch, accelerator.device)
        with gradient_sync(accelerator, model, last=j == len(micro_batches) - 1), accelerator.autocast():
            out = loss_step(model, batch)
            # The sum over the step's examples / their global count (scaled for the reductions after).
            accelerator.backward(out.loss.sum() * (loss_scale if micro.count else 0) / step_total)
        # A stand-in's NaN counts too: 0 × NaN is still NaN in the gradients it sends.
        finite = torch.isfinite(out.loss.detach()).flatten().tolist()
        bad += [i for i, ok in zip(micro.indices, finite) if not ok]
        add_metrics(sums, shares, {"loss": out.loss.detach().mean(), **out.metrics}, micro.count / step_total)
    return sums, shares, bad, tokens


def nonfinite_records(accelerator, bad: list[int], step: list[list[int]], grad_norm: float) -> str:
    """The records of a non-finite step: those with a non-finite loss (from every process), or all of them."""
    from accelerate.utils import gather_object

    bad = sorted(set(gather_object(bad)))  # a collective: every process is here, on the same step
    what = (f"a non-finite loss on training records {bad}" if bad else
            f"a non-finite gradient norm ({grad_norm}) on training records {sorted(i for m in step for i in m)}")
    return f"{what} (positions in the records the method built)"


def nonfinite_message(where: str, what: str, checkpoints: Path, checkpoint: int) -> str:
    """What stopped the run (``where``: the step; ``what``: what was not finite, on which rows) and what is kept.
    Shared by the epoch loop and LSP's online loop."""
    kept = f"the last checkpoint, step {checkpoint}, is kept in {checkpoints}" if checkpoint else "no checkpoint yet"
    return (f"{where}: {what}; nothing was saved from this step and {kept}; "
            "train.on_nonfinite=skip_step skips such steps")


def _same(row: dict, fields: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in fields.items())


def checkpoint_dir(folder: Path, step: int) -> Path:
    """The checkpoint of ``step`` in a checkpoints folder (``RunDir.checkpoints``)."""
    return folder / f"step-{step:08d}"


def save_checkpoint(accelerator, scheduler, folder: Path, step: int, loop_state: dict | None = None) -> None:
    """save_state into a temporary folder, rename it into place, then drop older checkpoints.

    ``loop_state`` (JSON) is the caller's own counters, read back on resume."""
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
