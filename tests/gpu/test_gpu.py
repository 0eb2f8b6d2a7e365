"""GPU runs: skipped on machines without CUDA (the test suite's CPU machines)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import REPO, tiny_overrides

from sparring.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["data.num_prompts=32", "eval.num_examples=16"]


def test_spin_on_gpu_trains_in_bf16_and_saves_bf16_weights(tiny_ground, tmp_path):
    out = tmp_path / "run"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    state = json.loads((out / "state.json").read_text())
    assert "iter1" in state["stages"]
    tensors = load_file(str(out / "iter_001" / "model" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # model.dtype: auto on a GPU


def test_vllm_generation_backend(tiny_ground, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "generation.backend=vllm", "spin.iterations=1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "iter_000" / "generated.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all("text" in r for r in rows)
