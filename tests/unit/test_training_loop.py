"""The shared loop: data plan, gradient accumulation, resume from a mid-epoch checkpoint, stopping on
a signal, non-finite losses."""

from __future__ import annotations

import math
import os
import signal
from collections import namedtuple
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from sparring.config import TrainConfig
from sparring.losses import spin_loss
from sparring.training import MetricsLogger, train
from sparring.training.loop import EXIT_PREEMPTED, NonFiniteLoss, Preempted, plan_steps
from sparring.training.optim import linear_schedule


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(4, 1)


def records(n=24):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, generator=g), torch.randn(4, generator=g), float(i % 3), float(i % 5)) for i in range(n)]


ToyBatch = namedtuple("ToyBatch", "real generated opponent_real opponent_generated attention_mask")


def collate(rows):
    # attention_mask: 3 "tokens" per record, what the loop's tokens/s counts
    return ToyBatch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                    torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]), torch.ones(len(rows), 3))


class Boom(RuntimeError):
    pass


def step(model, batch, calls=None, fail_at=None):
    if calls is not None:
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Boom
    real, gen, o_r, o_g = batch[:4]
    return spin_loss(model.w(real).squeeze(-1), model.w(gen).squeeze(-1), o_r, o_g, scale=0.5)


def run(tmp_path, cfg, model=None, **kw):
    from accelerate import Accelerator

    model = model or Toy()
    logger = MetricsLogger(tmp_path / "metrics.jsonl", None)
    result = train(model, records(), collate=collate, loss_step=kw.pop("loss_step", step), cfg=cfg,
                   accelerator=Accelerator(cpu=True), folder=tmp_path, logger=logger, log_fields={"iteration": 0})
    return model, result, logger


def test_plan_visits_every_record_once_per_epoch():
    cfg = TrainConfig(epochs=2, batch_size=5, grad_accum=2, seed=3)
    plan = plan_steps(23, cfg, world=1)
    assert len(plan) == 2 * 3  # 5 micro-batches of 5 per epoch, grouped by 2
    flat = [i for s in plan for m in s for i in m]
    assert sorted(flat[:23]) == list(range(23)) and sorted(flat[23:]) == list(range(23))
    assert flat[:23] != flat[23:]  # a new permutation each epoch


def padding(plan, lengths) -> int:
    """Pad tokens of every micro-batch padded to its longest record."""
    return sum(len(m) * max(lengths[i] for i in m) - sum(lengths[i] for i in m) for s in plan for m in s)


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouped_plan_visits_every_record_once_per_epoch_with_little_padding(world):
    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(5.0, 0.8).sample((1003,)) + 1).long().tolist()  # long-tailed
    grouped = TrainConfig(epochs=2, batch_size=4, grad_accum=2, seed=3, group_by_length=True)
    plan = plan_steps(1003, grouped, world, lengths)
    plain = plan_steps(1003, TrainConfig(epochs=2, batch_size=4, grad_accum=2, seed=3), world, lengths)
    assert [[len(m) for m in s] for s in plan] == [[len(m) for m in s] for s in plain]  # the same shapes
    flat = [i for s in plan for m in s for i in m]
    assert sorted(flat[:1003]) == list(range(1003)) and sorted(flat[1003:]) == list(range(1003))
    assert flat[:1003] != flat[1003:]
    assert plan == plan_steps(1003, grouped, world, lengths)  # seeded: a resume plans the same steps
    assert padding(plan, lengths) < 0.2 * padding(plain, lengths)
    sizes = [max(lengths[i] for i in s[0]) for s in plan[:40]]
    assert sizes != sorted(sizes, reverse=True)  # the steps are shuffled, not longest first


def test_training_with_group_by_length_pads_less_and_counts_the_records_token_ids(tmp_path):
    from typing import NamedTuple

    from accelerate import Accelerator

    from sparring.training.loop import record_tokens

    class Rec(NamedTuple):
        prompt_ids: list[int]
        real_ids: list[int]
        opponent: float

    assert record_tokens(Rec([1, 2], [3], 0.5)) == 3 and record_tokens((1, 2)) == 0
    recs = [Rec([1] * (1 + (i * 7) % 13), [2] * (1 + (i * 5) % 17), 0.1 * i) for i in range(64)]
    Batch = namedtuple("Batch", "x attention_mask")

    def collate_recs(rows):
        width = max(record_tokens(r) for r in rows)
        mask = torch.tensor([[1] * record_tokens(r) + [0] * (width - record_tokens(r)) for r in rows])
        return Batch(torch.tensor([[r.opponent] * 4 for r in rows]), mask)

    widths = {}
    for group in (False, True):
        seen = widths[group] = []

        def loss_step(model, batch, seen=seen):
            seen.append(batch.attention_mask.numel() - int(batch.attention_mask.sum()))
            return SimpleNamespace(loss=model.w(batch.x).squeeze(-1) ** 2, metrics={})

        cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, group_by_length=group)
        train(Toy(), recs, collate=collate_recs, loss_step=loss_step, cfg=cfg, accelerator=Accelerator(cpu=True),
              folder=tmp_path / str(group), logger=MetricsLogger(tmp_path / f"{group}.jsonl", None), log_fields={})
    assert len(widths[True]) == len(widths[False]) == 16
    assert sum(widths[True]) < 0.5 * sum(widths[False])


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a, _, _ = run(tmp_path / "a", TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=8, grad_accum=1, warmup_ratio=0))
    b, _, _ = run(tmp_path / "b", TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=4, grad_accum=2, warmup_ratio=0))
    # The same permutation, cut into micro-batches of 4 instead of 8: identical updates.
    plan_a = plan_steps(24, TrainConfig(epochs=1, batch_size=8), 1)
    plan_b = plan_steps(24, TrainConfig(epochs=1, batch_size=4, grad_accum=2), 1)
    assert [sum(s, []) for s in plan_a] == [sum(s, []) for s in plan_b]
    torch.testing.assert_close(a.w.weight, b.w.weight, rtol=1e-6, atol=1e-7)


def test_interrupted_training_resumes_to_the_same_weights_and_metrics(tmp_path):
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-2, epochs=2, batch_size=4, save_steps=2, warmup_ratio=0.25)
    ref, ref_result, ref_logger = run(tmp_path / "ref", cfg)

    calls: list[int] = []
    with pytest.raises(Boom):  # dies in step 6, after the checkpoint of step 4
        run(tmp_path / "cut", cfg, loss_step=partial(step, calls=calls, fail_at=6))
    assert (tmp_path / "cut" / "checkpoints" / "step-00000004").is_dir()
    calls.clear()
    resumed, result, logger = run(tmp_path / "cut", cfg, loss_step=partial(step, calls=calls))
    assert len(calls) == 12 - 4  # only the steps after the checkpoint ran again
    torch.testing.assert_close(resumed.w.weight, ref.w.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(resumed.w.bias, ref.w.bias, rtol=0, atol=1e-7)
    assert [r["step"] for r in logger.rows()] == list(range(1, 13))  # no duplicated rows
    assert [r["loss"] for r in logger.rows()] == pytest.approx([r["loss"] for r in ref_logger.rows()], abs=1e-7)
    assert result.steps == ref_result.steps == 12


def test_logged_metrics_use_trl_names(tmp_path):
    _, result, logger = run(tmp_path, TrainConfig(epochs=1, batch_size=8, lr=1e-3))
    row = logger.rows()[0]
    for name in ["loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
                 "logps/real", "logps/generated", "lr", "grad_norm", "epoch"]:
        assert name in row


class RankOf:
    """One process of a simulated ``world``: a real single-process Accelerator that claims ``rank``
    and records, per step, the gradients DDP would average and the metric totals it would sum."""

    def __init__(self, rank: int, world: int):
        from accelerate import Accelerator

        self._accelerator = Accelerator(cpu=True)
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.grads: list[torch.Tensor] = []
        self.totals: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def clip_grad_norm_(self, params, max_norm):
        self.grads.append(torch.cat([p.grad.flatten() for p in params]))
        return torch.tensor(0.0)

    def reduce(self, tensor, reduction="sum"):
        self.totals.append(tensor.clone())
        return tensor


class DeepSpeedStub(RankOf):
    """What the loop sees of accelerate under DeepSpeed: the plugin's config, and an engine whose
    backward divides the loss by its accumulation steps and takes sync_gradients as the boundary."""

    def __init__(self):
        super().__init__(rank=0, world=1)
        config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(gradient_accumulation_steps=None,
                                                                      deepspeed_config=config))
        self.boundaries: list[bool] = []

    def backward(self, loss):
        self.boundaries.append(self.sync_gradients)
        (loss / self.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]).backward()


def simulate(tmp_path, cfg: TrainConfig, world: int, n: int, ranks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients, metric totals) per step as the all-reduce would see them: lr 0 keeps every
    simulated rank on the same weights, so each can run alone."""
    ranks = ranks or [RankOf(r, world) for r in range(world)]
    for r, accelerator in enumerate(ranks):
        train(Toy(), records(n), collate=collate, loss_step=step, cfg=cfg, accelerator=accelerator,
              folder=tmp_path / str(r), logger=MetricsLogger(tmp_path / f"{r}.jsonl", None), log_fields={})
    grads = torch.stack([torch.stack(a.grads) for a in ranks]).mean(0)  # DDP averages over ranks
    totals = torch.stack([torch.stack(a.totals) for a in ranks]).sum(0)
    return grads, totals


def test_two_processes_with_an_idle_rank_match_one_process_with_twice_the_batch(tmp_path):
    # 25 records in micro-batches of 8: the last micro-batch holds one record, so rank 1 has none.
    one = TrainConfig(optimizer="adamw", lr=0.0, epochs=1, batch_size=8, grad_accum=2, save_steps=100)
    two = TrainConfig(optimizer="adamw", lr=0.0, epochs=1, batch_size=4, grad_accum=2, save_steps=100)
    assert plan_steps(25, one, 1) == plan_steps(25, two, 2)
    grads1, totals1 = simulate(tmp_path / "one", one, world=1, n=25)
    grads2, totals2 = simulate(tmp_path / "two", two, world=2, n=25)
    torch.testing.assert_close(grads2, grads1, rtol=1e-6, atol=1e-7)
    # Example-weighted metric means: sums over their shares, the stand-in record counting for nothing.
    # the last three: the step's tokens (each counted once, the stand-in not at all), non-finite and stop flags
    torch.testing.assert_close(totals2[:, -3], totals1[:, -3])
    assert totals1[:, -3].sum() == 3 * 25
    totals1, totals2 = totals1[:, :-3], totals2[:, :-3]
    half = totals1.shape[1] // 2
    torch.testing.assert_close(totals2[:, :half] / totals2[:, half:], totals1[:, :half] / totals1[:, half:],
                               rtol=1e-6, atol=1e-7)


def test_deepspeed_accumulates_micro_batches_into_one_engine_step(tmp_path):
    # 24 records in micro-batches of 4, 4 per step: a step of 4 micro-batches, then one of 2.
    cfg = TrainConfig(optimizer="adamw", lr=0.0, epochs=1, batch_size=4, grad_accum=4, max_grad_norm=0.5,
                      save_steps=100)
    deepspeed = DeepSpeedStub()
    grads, totals = simulate(tmp_path / "ds", cfg, world=1, n=24, ranks=[deepspeed])
    plugin = deepspeed.state.deepspeed_plugin
    assert plugin.gradient_accumulation_steps == deepspeed.gradient_accumulation_steps == 4
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
                                       "train_batch_size": 16, "gradient_clipping": 0.5,
                                       "zero_optimization": {"stage": 3}}
    # The engine steps only at the last micro-batch of each step, the short last step included.
    assert deepspeed.boundaries == [False, False, False, True, False, True]
    # Its division by the accumulation steps is undone: the same gradients as without DeepSpeed.
    plain_grads, plain_totals = simulate(tmp_path / "plain", cfg, world=1, n=24)
    torch.testing.assert_close(grads, plain_grads, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(totals, plain_totals)


def weights_of(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def poisoned(model, batch, calls, at, example=None, seen=None):
    """``step``, but the loss of one example (all with None) is NaN at call ``at``; records the weights."""
    calls.append(1)
    if seen is not None:
        seen.append(weights_of(model))
    out = step(model, batch)
    if len(calls) == at:
        mask = torch.zeros_like(out.loss, dtype=torch.bool)
        mask[slice(None) if example is None else example] = True
        out = out._replace(loss=torch.where(mask, torch.full_like(out.loss, math.nan), out.loss))
    return out


def test_nonfinite_loss_stops_naming_step_and_records_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=4, save_steps=2)  # 6 steps of 4
    calls: list[int] = []
    with pytest.raises(NonFiniteLoss) as err:
        run(tmp_path, cfg, loss_step=partial(poisoned, calls=calls, at=5, example=1))
    record = plan_steps(24, cfg, 1)[4][0][1]  # the second record of step 5's micro-batch
    message = str(err.value)
    assert f"iteration 0 step 5 of 6: a non-finite loss on training records [{record}]" in message
    assert "the last checkpoint, step 4, is kept" in message and "train.on_nonfinite=skip_step" in message
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]  # none from the bad state
    rows = MetricsLogger(tmp_path / "metrics.jsonl").rows()
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["skipped_steps"] == 0 for r in rows)


def test_skip_step_drops_the_step_counts_it_and_the_count_survives_a_resume(tmp_path):
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=4, save_steps=4, on_nonfinite="skip_step")
    calls, seen = [], []

    def nan_then_crash(model, batch):
        if len(calls) == 5:
            raise Boom  # in step 6, after the checkpoint of step 4
        return poisoned(model, batch, calls, at=3, seen=seen)  # NaN losses at step 3

    with pytest.raises(Boom):
        run(tmp_path, cfg, loss_step=nan_then_crash)
    torch.testing.assert_close(seen[3], seen[2], rtol=0, atol=0)  # step 3 did not move the weights
    assert not torch.equal(seen[2], seen[1])  # the others did
    rows = MetricsLogger(tmp_path / "metrics.jsonl").rows()
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert math.isnan(rows[2]["loss"]) and rows[3]["lr"] == rows[2]["lr"]  # the schedule waited a step
    model, result, logger = run(tmp_path, cfg)
    assert [r["skipped_steps"] for r in logger.rows()] == [0, 0, 1, 1, 1, 1]  # counted once, across the resume
    assert result.last_metrics["skipped_steps"] == 1 and torch.isfinite(weights_of(model)).all()


@pytest.mark.parametrize(("signum", "at"), [(signal.SIGTERM, 3), (signal.SIGUSR1, 6)])
def test_stop_signal_finishes_the_step_checkpoints_and_the_rerun_resumes_to_the_same_weights(tmp_path, signum, at):
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=4, save_steps=100)  # 6 steps, no checkpoint
    ref, ref_result, ref_logger = run(tmp_path / "ref", cfg)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    calls: list[int] = []

    def signalled(model, batch):  # the signal lands inside step ``at``, before its backward
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return step(model, batch)

    with pytest.raises(Preempted, match=f"after iteration 0 step {at} of 6; checkpoint .*step-{at:08d}"):
        run(tmp_path / "cut", cfg, loss_step=signalled)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before  # handlers restored
    assert [r["step"] for r in MetricsLogger(tmp_path / "cut" / "metrics.jsonl").rows()] == list(range(1, at + 1))
    calls.clear()
    resumed, result, logger = run(tmp_path / "cut", cfg, loss_step=partial(step, calls=calls))
    assert len(calls) == 6 - at  # the interrupted step was finished, not redone
    torch.testing.assert_close(weights_of(resumed), weights_of(ref), rtol=0, atol=0)
    assert [r["loss"] for r in logger.rows()] == pytest.approx([r["loss"] for r in ref_logger.rows()], abs=1e-7)
    results = [{k: v for k, v in r.last_metrics.items() if not k.startswith("perf/")} for r in (result, ref_result)]
    assert results[0] == pytest.approx(results[1])  # also when no step was left to run (perf/: timings)


@pytest.mark.parametrize(("error", "code", "prefix"), [(Preempted("stopped by a signal after x"), EXIT_PREEMPTED,
                                                        "preempted: stopped by a signal after x (exit status 75)"),
                                                       (NonFiniteLoss("iteration 0 step 5 of 6: nan"), 2,
                                                        "error: iteration 0 step 5 of 6: nan")])
def test_cli_exit_status_and_message_of_a_stopped_run(monkeypatch, capsys, tmp_path, error, code, prefix):
    import sparring.algorithms as algorithms
    import sparring.modeling as modeling
    from sparring.cli import main

    def stopped(cfg, force=False):
        raise error

    monkeypatch.setattr(algorithms, "get", lambda method: stopped)
    monkeypatch.setattr(modeling, "ensure_base_model", lambda cfg: None)  # the quickstart builds no proving ground
    assert main(["run", f"output_dir={tmp_path}"]) == code
    assert prefix in capsys.readouterr().err


def test_batch_tokens_counts_the_real_tokens_of_every_attention_mask_in_a_batch():
    from collections import namedtuple

    from sparring.training.engine import peak_memory_gib
    from sparring.training.loop import batch_tokens

    Seq = namedtuple("Seq", "input_ids attention_mask")
    Pair = namedtuple("Pair", "real generated")
    real = Seq(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    generated = Seq(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert batch_tokens(real) == 5 and batch_tokens(Pair(real, generated)) == 9
    assert batch_tokens(torch.ones(3)) == 0  # not a collated batch
    assert 0 < peak_memory_gib(torch.device("cpu")) < 1024


def test_cosine_schedule_warms_up_linearly_then_follows_half_a_cosine_to_zero():
    import math

    from sparring.training.optim import make_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    schedule = make_schedule(optimizer, 10, TrainConfig(lr_scheduler="cosine", warmup_ratio=0.2))
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.0, 1.0, 2.0])  # 2 warm-up steps, then the peak
    assert lrs[3:] == pytest.approx([2.0 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 8)])
    linear = make_schedule(torch.optim.SGD([param], lr=2.0), 10, TrainConfig(warmup_ratio=0.2))
    for _ in range(6):
        linear.optimizer.step()
        linear.step()
    assert linear.get_last_lr()[0] == pytest.approx(1.0)  # the default stays HF's linear decay: 2·(10−6)/8


def test_weighted_step_loss_is_the_weighted_mean_over_the_whole_step_whatever_the_micro_batches(tmp_path):
    from accelerate import Accelerator

    from sparring.training.loop import run_micro_batches

    data = records(12)

    def weight(r):
        return 1.0 + r[2] + r[3]  # unequal per-record weights (record i: 1 + i % 3 + i % 5)

    def gradient(micro_batches):
        model, acc = Toy(), Accelerator(cpu=True)
        work = run_micro_batches(model, data, micro_batches, collate, step, acc, loss_scale=1, weight=weight)
        return model.w.weight.grad.clone(), work.sums["loss"] / work.shares["loss"]

    reference = Toy()  # Σ_i w_i·ℓ_i / Σ_i w_i on the whole step at once, by hand
    losses = step(reference, collate(data)).loss
    w = torch.tensor([weight(r) for r in data])
    ((losses * w).sum() / w.sum()).backward()
    for micro_batches in ([list(range(12))], [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]):
        grad, logged = gradient(micro_batches)
        torch.testing.assert_close(grad, reference.w.weight.grad, rtol=1e-5, atol=1e-7)
        assert logged == pytest.approx(float((losses.detach() * w).sum() / w.sum()), rel=1e-6)  # the loss logged
