"""Two CPU processes under torchrun (gloo): one job that trains, checkpoints, saves and evaluates
like a single process with twice the per-device batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, rows

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
# 25 pairs in micro-batches of 2 × 4, two per step: 2 optimizer steps with a checkpoint after the
# first, and a last micro-batch of one pair, which leaves process 1 without an example.
SMALL = ["spin.iterations=1", "data.num_prompts=25", "train.grad_accum=2", "train.save_steps=1",
         "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=16"]


def torchrun(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """``sparring.cli ARGS`` under torch.distributed.run; --standalone picks a free rendezvous port."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "sparring.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(tiny_ground, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("multiprocess") / "run"
    return out, torchrun(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "train.batch_size=4"], processes=2)


@pytest.fixture(scope="module")
def one_process_run(tiny_ground, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "train.batch_size=8"]) == 0
    return out


def test_two_processes_checkpoint_and_save_as_one_run(two_process_run):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One process group of two, not two single-process runs racing on the same folder.
    assert "processes: 2 (multi_cpu" in proc.stdout
    assert proc.stdout.count("starting spin run") == 1
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["iter0"]["steps"] == 2  # so the checkpoint of step 1 was written
    assert (out / "iter_000" / "model" / "model.safetensors").exists()


def test_two_processes_train_like_one_process_with_twice_the_batch(two_process_run, one_process_run):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same samples (generation batches are seeded by index), same weighted gradients, same steps.
    assert rows(out / "iter_000" / "generated.jsonl") == rows(one_process_run / "iter_000" / "generated.jsonl")
    assert_same_weights(out / "iter_000" / "model", one_process_run / "iter_000" / "model", atol=1e-6)
    train = [[r for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] for run in (out, one_process_run)]
    assert [r["step"] for r in train[0]] == [r["step"] for r in train[1]] == [1, 2]
    for two, one in zip(*train):
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
        assert two["rewards/margins"] == pytest.approx(one["rewards/margins"], abs=1e-6)
