"""Two CPU processes under torchrun (gloo): the run trains, checkpoints and saves as one job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
# 32 prompts, 8 per process: 2 optimizer steps, a checkpoint after the first.
SMALL = ["spin.iterations=1", "data.num_prompts=32", "train.batch_size=8", "train.save_steps=1",
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
    return out, torchrun(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL], processes=2)


def test_two_processes_checkpoint_and_save_as_one_run(two_process_run):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One process group of two, not two single-process runs racing on the same folder.
    assert "processes: 2 (multi_cpu" in proc.stdout
    assert proc.stdout.count("starting spin run") == 1
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["iter0"]["steps"] == 2  # so the checkpoint of step 1 was written
    assert (out / "iter_000" / "model" / "model.safetensors").exists()
