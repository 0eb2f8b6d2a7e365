"""Shared by the kill-and-resume tests: run the CLI in a subprocess, kill it at a stage, compare weights."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tests.conftest import REPO


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path) -> list[dict]:
    """The rows of a jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The model.safetensors of two model folders hold the same tensors (to ``atol``)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m sparring.cli ARGS`` in the background, output appended to ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sparring.cli", *args], stdout=log.open("a"),
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)


def kill_when(proc: subprocess.Popen, pattern: str, root: Path, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` as soon as a file matching ``pattern`` exists under ``root``; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(pattern)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern}")


def install_probe(mp, probe) -> None:
    """Wrap the stages' ``load_model``, ``generate`` and ``train`` with a test probe's recorders of the
    same names (``probe.load_model(real)`` returns the wrapper), for one in-process run under ``mp``."""
    import sparring.stages

    for name in ("load_model", "generate", "train"):
        mp.setattr(sparring.stages, name, getattr(probe, name)(getattr(sparring.stages, name)))


# The LSP tests' task reward, a module on a folder of sys.path: deterministic, with a non-zero signal even
# for nonsense queries (the tests' tiny model was not taught the challenger role, so the verifier would
# mark every query invalid).
REWARD_MODULE = "def reward(query, answer):\n    return float(len(answer) % 3) + 0.1 * len(query)\n"


def write_reward_module(folder: Path) -> Path:
    """``folder/lsp_test_reward.py`` (``lsp.reward.function=lsp_test_reward:reward``); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lsp_test_reward.py").write_text(REWARD_MODULE)
    return folder
