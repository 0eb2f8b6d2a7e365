"""LSP's online loop under a stop signal and a non-finite loss, as the shared epoch loop handles them
(tests/integration/test_preemption.py, tests/unit/test_training_loop.py): SIGTERM ends the step with a
checkpoint and EXIT_PREEMPTED, and the rerun ends with the weights of an uninterrupted run; a NaN
loss (or an inf gradient) stops the run naming the step, role and queries, or skips the update."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.integration.helpers import rows, spawn, weights
from tests.integration.test_lsp import CONFIG, lsp_rows, overrides

import sparring.algorithms.lsp as lsp_algorithm
import sparring.algorithms.lsp.rollouts as lsp_rollouts
from sparring.cli import main
from sparring.training.loop import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
# The tests' function reward (its tiny model was not taught the challenger role: with the verifier
# every query would be invalid and nothing would train).
REWARD = ["lsp.reward.kind=function", "lsp.reward.function=lsp_test_reward:reward", "train.lr=0.01"]


def test_sigterm_checkpoints_exits_preempted_and_the_rerun_matches_an_uninterrupted_run(tiny_ground, tmp_path, reward_dir):
    args = ["lsp.steps=6", "lsp.eval_every=3", *REWARD]
    whole = tmp_path / "whole"
    assert main(["run", CONFIG, *overrides(tiny_ground, whole, *args)]) == 0

    cut, log = tmp_path / "cut", tmp_path / "log.txt"
    command = ["run", CONFIG, *overrides(tiny_ground, cut, *args)]
    proc = spawn(command, log)
    deadline = time.time() + 120
    # a logged LSP step: the loop (and its signal handler) is running
    while not ((cut / "metrics.jsonl").exists() and '"kind": "lsp"' in (cut / "metrics.jsonl").read_text()):
        assert proc.poll() is None, "the run ended before its first LSP step:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, "timed out waiting for the first LSP step"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert f"(exit status {EXIT_PREEMPTED})" in text and "rerun the same command to resume" in text
    stopped = int(text.split("after LSP step ")[1].split(" ")[0])
    assert 1 <= stopped < 6  # mid-run, at a step boundary
    assert [p.name for p in (cut / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]
    assert "final" not in json.loads((cut / "state.json").read_text())["stages"]
    assert [r["step"] for r in lsp_rows(cut)] == list(range(1, stopped + 1))

    assert main(command) == 0  # the rerun resumes from the preemption checkpoint
    a, b = weights(whole / "model"), weights(cut / "model")
    initial = weights(Path(tiny_ground["model"]))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the runs did train
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done, straight = lsp_rows(cut), lsp_rows(whole)
    assert [r["step"] for r in done] == [r["step"] for r in straight] == list(range(1, 7))  # no duplicated rows
    assert [r["loss"] for r in done] == [r["loss"] for r in straight]
    assert all(r["skipped_steps"] == 0 for r in done)
    assert all(r["perf/tokens_per_second"] > 0 and r["perf/peak_memory_gib"] > 0 for r in done)  # throughput logged
    assert rows(cut / "samples.jsonl") == rows(whole / "samples.jsonl")  # steps 2, 4, 6, once each
    evals = [r["label"] for r in rows(cut / "metrics.jsonl") if r.get("kind") == "eval"]
    assert evals == ["step0", "step3", "step6"]


class InfGrad(torch.autograd.Function):
    """The identity, with an infinite gradient: a finite loss whose gradient norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison(monkeypatch, *, step: int, role: str, kind: str = "loss", seq: int = 1) -> dict:
    """In LSP step ``step``'s ``role`` pass, make sequence ``seq``'s loss NaN (``kind="loss"``) or the
    gradient infinite (``kind="grad"``). Returns what it saw: the model, and its weights at the start
    of every step's update (``seen[t - 1]``: the weights step t starts from)."""
    seen: dict = {"step": 0, "role": None, "weights": []}
    real_gradient, real_role, real_loss = (lsp_algorithm.policy_gradient, lsp_rollouts.backward_role,
                                           lsp_rollouts.reinforce_loss)

    def policy_gradient(model, *args, **kwargs):
        seen.update(step=seen["step"] + 1, role=None, model=model)
        seen["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_gradient(model, *args, **kwargs)

    def backward_role(*args, **kwargs):  # the solver's pass comes first, then the challenger's
        seen["role"] = "solver" if seen["role"] is None else "challenger"
        return real_role(*args, **kwargs)

    def reinforce_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if (seen["step"], seen["role"]) != (step, role):
            return out
        if kind == "grad":
            return out._replace(loss=InfGrad.apply(out.loss))
        bad = torch.zeros_like(out.loss, dtype=torch.bool)
        bad[seq] = True
        return out._replace(loss=torch.where(bad, torch.full_like(out.loss, math.nan), out.loss))

    monkeypatch.setattr(lsp_algorithm, "policy_gradient", policy_gradient)
    monkeypatch.setattr(lsp_rollouts, "backward_role", backward_role)
    monkeypatch.setattr(lsp_rollouts, "reinforce_loss", reinforce_loss)
    return seen


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("role", "kind", "what"), [
    ("solver", "loss", "a non-finite solver loss on the answers to queries [0] (answers [1], i·G + j)"),
    ("challenger", "loss", "a non-finite challenger loss on queries [1]"),
    ("solver", "grad", "a non-finite gradient norm"),
])
def test_nonfinite_error_names_step_role_and_queries_and_keeps_the_last_checkpoint(
        tiny_ground, tmp_path, reward_dir, monkeypatch, capsys, role, kind, what):
    seen = poison(monkeypatch, step=3, role=role, kind=kind)
    out = tmp_path / "run"
    assert main(["run", CONFIG, *overrides(tiny_ground, out, *REWARD)]) == 2  # 4 steps, checkpoints every 2
    message = capsys.readouterr().err
    assert f"LSP step 3 of 4: {what}" in message and "query indices i = 0..N−1 of the step" in message
    assert "the last checkpoint, step 2, is kept" in message and "train.on_nonfinite=skip_step" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # none from the bad step
    assert [r["step"] for r in lsp_rows(out)] == [1, 2]
    assert "final" not in json.loads((out / "state.json").read_text())["stages"]
    # no optimizer step: the model still holds the weights step 3 started from, those of the checkpoint
    start = seen["weights"][2]
    assert same({k: v.detach() for k, v in seen["model"].state_dict().items()}, start)
    assert not same(start, seen["weights"][1])  # while steps 1–2 did train
    saved = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], start[k]) for k in saved)


def test_skip_step_drops_the_update_counts_it_and_the_schedule_waits(tiny_ground, tmp_path, reward_dir, monkeypatch):
    seen = poison(monkeypatch, step=3, role="solver")
    out = tmp_path / "run"
    assert main(["run", CONFIG, *overrides(tiny_ground, out, *REWARD, "train.on_nonfinite=skip_step")]) == 0
    metrics = lsp_rows(out)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in metrics] == [0, 0, 1, 1]
    assert math.isnan(metrics[2]["loss"]) and metrics[3]["lr"] == metrics[2]["lr"]  # no schedule step either
    assert metrics[2]["lr"] < metrics[1]["lr"]
    w = seen["weights"]
    assert same(w[3], w[2])  # step 3's update never happened: step 4 starts where step 3 did
    assert not same(w[2], w[1])
    final = weights(out / "model")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], w[3][k]) for k in final if k in w[3])  # step 4 trained


def test_nonfinite_message_names_the_data_prompt_rows_and_both_roles():
    sol, ch = {"nonfinite": [1, 4, 5]}, {"nonfinite": [0]}
    text = lsp_rollouts.nonfinite_what(sol, ch, 2, 3.0, prompt_rows=[7, 3, 9])
    assert text == ("a non-finite solver loss on the answers to queries [0, 2] (answers [1, 4, 5], i·G + j) and a "
                    "non-finite challenger loss on queries [0] (query indices i = 0..N−1 of the step; lsp.prompts "
                    "rows [7, 3, 9] in query order)")
