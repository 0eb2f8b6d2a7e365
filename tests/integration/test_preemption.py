"""SIGTERM during training: the step is finished, a checkpoint written, the exit status says so, and
the rerun ends with the weights of a run never interrupted."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, rows, spawn

from sparring.cli import main
from sparring.training.loop import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
# 24 pairs in batches of 2: 12 optimizer steps. save_steps=1 in the preempted run only (it decides
# when checkpoints are written, nothing else), so it has a checkpoint folder to watch for.
SMALL = ["spin.iterations=1", "data.num_prompts=24", "train.batch_size=2", "generation.batch_size=8",
         "train.logprob_batch_size=8", "eval.num_examples=8"]


def wait_for(pattern: str, root: Path, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)):
        assert proc.poll() is None, f"the run ended before {pattern} appeared"
        assert time.time() < deadline, f"timed out waiting for {pattern}"
        time.sleep(0.01)


def test_sigterm_checkpoints_exits_preempted_and_the_rerun_matches_an_uninterrupted_run(tiny_ground, tmp_path):
    whole = tmp_path / "whole"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, whole), *SMALL]) == 0

    out, log = tmp_path / "cut", tmp_path / "log.txt"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "train.save_steps=1"]
    proc = spawn(args, log)
    wait_for("iter_000/checkpoints/step-*", out, proc)  # training runs: the handler is in place
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert f"(exit status {EXIT_PREEMPTED})" in text and "rerun the same command to resume" in text
    stopped = int(text.split("after iteration 0 step ")[1].split(" ")[0])
    assert 1 <= stopped < 12  # stopped mid-training, at a step boundary
    assert [p.name for p in (out / "iter_000" / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]
    assert "iter0" not in json.loads((out / "state.json").read_text())["stages"]
    assert [r["step"] for r in rows(out / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, stopped + 1))

    again = spawn(args, log)
    assert again.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_same_weights(out / "iter_000" / "model", whole / "iter_000" / "model")
    train = [[r for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] for run in (out, whole)]
    assert [r["step"] for r in train[0]] == [r["step"] for r in train[1]] == list(range(1, 13))
    assert [r["loss"] for r in train[0]] == pytest.approx([r["loss"] for r in train[1]], abs=1e-6)
