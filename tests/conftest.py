"""Shared fixtures: a tiny proving ground (data + SFT model) built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is as fast, and two threads spin against each other when the
# machine is busy (the subprocess runs of the kill-and-resume tests inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_ground(tmp_path_factory) -> dict[str, str]:
    """{"model", "train", "eval"}: a small SFT model (seconds of CPU) and its data files."""
    from sparring.config import SftConfig
    from sparring.tasks.sft import build_proving_ground

    root = tmp_path_factory.mktemp("ground")
    cfg = SftConfig(output_dir=str(root), num_train=200, num_eval=40, hidden_size=64, steps=60, batch_size=32)
    model = build_proving_ground(cfg)
    return {"model": str(model), "train": str(root / "data" / "train.jsonl"), "eval": str(root / "data" / "eval.jsonl")}


def tiny_overrides(ground: dict[str, str], out: Path, *, data: bool = True) -> list[str]:
    """Dotted overrides pointing a tiny config at the session's proving ground and ``out`` (``data``
    False: no data.source, for LSP, which reads no training data)."""
    return [
        f"output_dir={out}",
        f"model.name_or_path={ground['model']}",  # exists: the CLI builds no proving ground
        *([f"data.source={ground['train']}"] if data else []),
        f"eval.source={ground['eval']}",
    ]


def small_model(tok, seed: int = 0):
    """A fresh 1-layer Llama of hidden size 32 on the character tokenizer ``tok`` (unit tests)."""
    from sparring.tasks import build_tiny_model

    return build_tiny_model(tok, hidden_size=32, layers=1, heads=2, seed=seed)
