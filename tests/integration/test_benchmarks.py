"""The benchmark scripts run (at toy sizes, numbers meaningless) so that they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.conftest import REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_real_shapes_benchmark_runs_every_side_and_prints_its_ratios():
    out = run_script("benchmarks/real_shapes.py", "--quick", "--stop-every", "5")  # rows that finish early too
    for side in ("sparring ", "sparring-unshared ", "sparring-plain ", "trl-default ", "trl-best "):
        assert any(line.startswith(side) for line in out.splitlines()), side
    for ratio in ("ratio sparring/sparring-unshared: time", "ratio sparring/sparring-plain: time",
                  "ratio sparring/trl-default: time",
                  "ratio sparring/trl-best: time", "ratio tokens/s sparring (defaults)/SPIN loop:", "sparring via model.generate", "a turn ends after about one token in 5"):
        assert ratio in out
    assert "length-grouped, prompt shared" in out and "3. sparring training pass" in out


@pytest.mark.parametrize("data", [["--pairs", "8", "--hidden", "64", "--layers", "2", "--length-scale", "0.05"],
                                  ["--vocab", "0", "--pairs", "32", "--hidden", "32", "--layers", "1"]])
def test_spin_vs_trl_benchmark_keeps_its_closing_line(data):
    out = run_script("benchmarks/spin_vs_trl_dpo.py", *data)
    assert out.strip().splitlines()[-1].startswith("ratio sparring/trl: time ")
    assert ("vocab=32000" in out) == ("--vocab" not in data)
