"""The epoch loop over precomputed records, fed by composition (a collate function and a loss step).

SPIN, T-SPIN, TPAW and SFT call ``train(...)`` with their records, a ``collate(records) -> batch`` and
a ``loss_step(model, batch) -> LossOutput``. The loop owns the data order (a seeded permutation per
epoch), the split of each optimizer step into micro-batches and across processes, and the train log
rows; the step engine (``training.engine``) owns the optimizer, the schedule, clipping, the metric
reduction, the non-finite and stop-signal decisions and the resumable checkpoints: every
``save_steps`` optimizer steps, and a rerun loads the newest one and skips the steps it covers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparring.config import TrainConfig
from sparring.losses import LossOutput
from sparring.progress import progress
from sparring.training.engine import Engine, Work, add_metrics
from sparring.training.metrics import MetricsLogger

# The stop signals' names stay importable from the loop (the CLI and users catch them here).
from sparring.training.signals import EXIT_PREEMPTED, NonFiniteLoss, Preempted, StopRequest  # noqa: F401


@dataclass
class TrainResult:
    steps: int
    last_metrics: dict[str, float]
    model: Any = None  # the model as prepared by accelerate (DDP/FSDP/DeepSpeed wrapper): save from this


LENGTH_WINDOW = 50  # micro-batches per sorted window of train.group_by_length (HF's megabatch of 50 batches)


def plan_steps(n: int, cfg: TrainConfig, world: int, lengths: list[int] | None = None) -> list[list[list[int]]]:
    """Optimizer steps → micro-batches → record indices (global, before splitting across processes).

    With ``train.group_by_length`` and the records' ``lengths``, micro-batches hold records of similar
    length (``group_by_length``); the plan stays a function of the seed, the epoch and the lengths."""
    micro = cfg.batch_size * world
    steps = []
    for epoch in range(cfg.epochs):
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(n, generator=generator).tolist()
        if cfg.group_by_length and lengths is not None:
            micros = group_by_length(perm, lengths, micro, generator)
        else:
            micros = [perm[i : i + micro] for i in range(0, n, micro)]
        steps += [micros[i : i + cfg.grad_accum] for i in range(0, len(micros), cfg.grad_accum)]
    return steps


def group_by_length(perm: list[int], lengths: list[int], micro: int, generator: torch.Generator) -> list[list[int]]:
    """``perm`` cut into windows of LENGTH_WINDOW micro-batches, each sorted by length (longest first,
    ties in permutation order) and cut into micro-batches of ``micro``; the full micro-batches then
    in a seeded random order, a last partial one (when n is not a multiple) last."""
    window = micro * LENGTH_WINDOW
    micros = []
    for start in range(0, len(perm), window):
        ordered = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        micros += [ordered[i : i + micro] for i in range(0, len(ordered), micro)]
    tail = [micros.pop()] if len(micros[-1]) < micro else []
    return [micros[k] for k in torch.randperm(len(micros), generator=generator).tolist()] + tail


def record_tokens(record: Any) -> int:
    """A training record's tokens: the summed lengths of its token-id fields (those named ``*_ids``)."""
    if not (isinstance(record, tuple) and hasattr(record, "_fields")):
        return 0
    return sum(len(value) for name, value in zip(record._fields, record) if name.endswith("_ids"))


@dataclass
class MicroBatch:
    indices: list[int]  # the records this process runs
    count: int  # how many of them are its share; 0 for a stand-in record run only to join the all-reduce


def shard_step(step: list[list[int]], rank: int, world: int) -> list[MicroBatch]:
    """This process's share of each micro-batch. A process left without examples still runs one
    record (DDP needs every rank in each gradient all-reduce) that counts for nothing."""
    return [MicroBatch(m[rank::world] or m[:1], len(m[rank::world])) for m in step]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    return batch


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
    weight: Callable[[Any], float] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``records``; resumes from the newest checkpoint under ``folder``.

    The step's loss is the mean of the per-example losses over all the step's examples (every
    micro-batch, every process); with ``weight(record)`` it is their ``weight``-weighted mean instead
    (SFT: weight = response tokens, so the step's loss is the mean token NLL over the whole step)."""
    if not records:
        raise ValueError("no training records")
    lengths = [record_tokens(r) for r in records] if cfg.group_by_length else None
    plan = plan_steps(len(records), cfg, accelerator.num_processes, lengths)
    total = len(plan)
    where = " ".join(f"{k} {v}" for k, v in log_fields.items()) or "training"
    engine = Engine(model, cfg, accelerator, total_steps=total, checkpoints=folder / "checkpoints", where=where)
    engine.open_logs(logger, drop=lambda r: r.get("kind") == "train" and _same(r, log_fields), offset=global_step_offset)
    bar = progress(total=total, initial=engine.start, desc=desc, enabled=accelerator.is_main_process, unit="step")
    try:
        with StopRequest() as stop:
            for step in range(engine.start, total):
                done = step + 1

                def work(model, step=step) -> Work:
                    w = run_micro_batches(model, records, plan[step], collate, loss_step, accelerator,
                                          loss_scale=engine.loss_scale, weight=weight)
                    w.describe_bad = lambda bad, norm: nonfinite_records(accelerator, bad, plan[step], norm)
                    return w

                end = engine.step(work, stop, done=done)
                bar.update(1)
                bar.set_postfix(loss=f"{end.metrics['loss']:.4f}")
                if done % cfg.logging_steps == 0 or done == total or end.stopping:
                    row = {"kind": "train", **log_fields, "step": done, "epoch": round(done / total * cfg.epochs, 4)}
                    logger.log({**row, **end.metrics}, step=global_step_offset + done)
                engine.finish(done, end, save=done % cfg.save_steps == 0 and done < total)
    finally:
        bar.close()
        logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(steps=total, last_metrics=engine.state["last_metrics"], model=engine.model)


def batch_tokens(batch: Any) -> int:
    """Real (unpadded) tokens of a collated batch: the sum of every ``attention_mask`` it holds."""
    if not (isinstance(batch, tuple) and hasattr(batch, "_fields")):
        return 0
    return sum(int(value.sum()) if name == "attention_mask" and isinstance(value, torch.Tensor) else batch_tokens(value)
               for name, value in zip(batch._fields, batch))


def run_micro_batches(model, records, step: list[list[int]], collate, loss_step, accelerator, *, loss_scale: int,
                      weight: Callable[[Any], float] | None = None):
    """Forward and backward over this process's share of one optimizer step.

    Returns the step's metric sums and shares (example-weighted), the records whose loss was not
    finite and the real tokens this process ran."""
    micro_batches = shard_step(step, accelerator.process_index, accelerator.num_processes)
    # Each example's share of the step's loss: 1 / the step's example count, or weight / the step's
    # total weight (every process computes the same totals from the plan).
    weights = {i: float(weight(records[i])) if weight else 1.0 for m in step for i in m}
    step_total = sum(weights.values())
    sums: dict[str, float] = {}
    shares: dict[str, float] = {}  # the share of the step's loss each metric was measured on
    bad: list[int] = []
    tokens = 0
    for j, micro in enumerate(micro_batches):
        batch = collate([records[i] for i in micro.indices])
        # counted on the collated (host) batch: no device sync; a stand-in batch (count 0) does no real work
        tokens += batch_tokens(batch) if micro.count else 0
        batch = to_device(batch, accelerator.device)
        with gradient_sync(accelerator, model, last=j == len(micro_batches) - 1), accelerator.autocast():
            out = loss_step(model, batch)
            loss = out.loss.sum() if weight is None else (out.loss * out.loss.new_tensor([weights[i] for i in micro.indices])).sum()
            # The (weighted) sum over the step's examples / their global total (scaled for the reductions after).
            accelerator.backward(loss * (loss_scale if micro.count else 0) / step_total)
        # A stand-in's NaN counts too: 0 × NaN is still NaN in the gradients it sends.
        finite = torch.isfinite(out.loss.detach()).flatten().tolist()
        bad += [i for i, ok in zip(micro.indices, finite) if not ok]
        mine = sum(weights[i] for i in micro.indices) if micro.count else 0.0
        add_metrics(sums, shares, {"loss": loss.detach() / max(mine, 1e-30) if weight else out.loss.detach().mean(),
                                   **out.metrics}, mine / step_total)
    return Work(sums, shares, bad, tokens)


def nonfinite_records(accelerator, bad: list[int], step: list[list[int]], grad_norm: float) -> str:
    """The records of a non-finite step: those with a non-finite loss (from every process), or all of them."""
    from accelerate.utils import gather_object

    bad = sorted(set(gather_object(bad)))  # a collective: every process is here, on the same step
    what = (f"a non-finite loss on training records {bad}" if bad else
            f"a non-finite gradient norm ({grad_norm}) on training records {sorted(i for m in step for i in m)}")
    return f"{what} (positions in the records the method built)"


def _same(row: dict, fields: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in fields.items())
