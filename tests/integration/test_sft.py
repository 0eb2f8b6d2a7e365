"""The SFT method (``method: sft``, ``sparring sft CONFIG``) on the shared epoch loop: any supported
data, a saved and evaluated θ1, resume after SIGKILL, two processes like one with twice the batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, kill_when, rows, spawn

from sparring.cli import main

CONFIG = str(REPO / "configs" / "sft" / "tiny.yaml")
# All 200 rows of the ground, 2 epochs in batches of 20; held-out scores on 32 of the training rows (what
# SFT must fit), so the test measures the fit, not the generalisation of a 0.1M-parameter model.
SMALL = ["data.num_prompts=null", "train.batch_size=20", "train.epochs=2", "eval.num_examples=32"]


def prompt_completion_file(ground: dict[str, str], path: Path) -> Path:
    """The ground's training rows rewritten in the prompt-completion format (conversational)."""
    out = []
    for r in rows(Path(ground["train"])):
        *prompt, answer = r["messages"]
        out.append({"prompt": prompt, "completion": [answer]})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.fixture(scope="module")
def sft_run(tiny_ground, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    data = prompt_completion_file(tiny_ground, root / "pc.jsonl")
    out = root / "run"
    assert main(["sft", CONFIG, *tiny_overrides(tiny_ground, out), f"data.source={data}", f"eval.source={data}",
                 *SMALL]) == 0
    return out


def test_sft_on_prompt_completion_data_saves_evaluates_and_raises_the_real_log_prob(sft_run: Path):
    state = json.loads((sft_run / "state.json").read_text())
    assert state["method"] == "sft" and state["stages"]["iter0"]["examples"] == 200
    assert (sft_run / "iter_000" / "model" / "model.safetensors").exists()
    assert not (sft_run / "iter_000" / "checkpoints").exists()  # dropped once the iteration is done
    initial, after = (json.loads((sft_run / "eval" / f"{label}.json").read_text()) for label in ("initial", "iter0"))
    assert after["logps_real_per_token"] > initial["logps_real_per_token"]  # it fitted the responses
    train = [r for r in rows(sft_run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))  # 2 epochs of 200 rows in batches of 20
    assert {"loss", "logps", "grad_norm", "lr", "perf/tokens_per_second"} <= train[-1].keys()
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    assert "θ1 (after iteration 0)" in (sft_run / "results.md").read_text()


def test_sft_killed_mid_training_resumes_to_the_uninterrupted_weights(sft_run: Path, tiny_ground, tmp_path):
    data = prompt_completion_file(tiny_ground, tmp_path / "pc.jsonl")
    out, log = tmp_path / "killed", tmp_path / "log.txt"
    args = ["sft", CONFIG, *tiny_overrides(tiny_ground, out), f"data.source={data}", f"eval.source={data}", *SMALL,
            "train.save_steps=3"]
    assert kill_when(spawn(args, log), "iter_000/checkpoints/step-*", out), log.read_text()[-2000:]
    assert spawn(args, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resuming sft run" in log.read_text()
    assert_same_weights(out / "iter_000" / "model", sft_run / "iter_000" / "model")


@pytest.mark.slow
def test_sft_on_two_processes_trains_like_one_process_with_twice_the_batch(tiny_ground, tmp_path):
    from tests.integration.test_multiprocess import torchrun

    data = prompt_completion_file(tiny_ground, tmp_path / "pc.jsonl")
    args = [f"data.source={data}", "data.num_prompts=30", "train.epochs=1", "eval.num_examples=8"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(["sft", CONFIG, *tiny_overrides(tiny_ground, two), *args, "train.batch_size=4"], processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes: 2 (multi_cpu" in proc.stdout
    assert main(["sft", CONFIG, *tiny_overrides(tiny_ground, one), *args, "train.batch_size=8"]) == 0
    # Float noise only (reduction order), as for SPIN: 1e-6 on weights of magnitude ~0.1–1.
    assert_same_weights(two / "iter_000" / "model", one / "iter_000" / "model", atol=1e-6)
