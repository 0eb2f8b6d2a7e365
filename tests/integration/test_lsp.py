"""LSP end to end on the tiny proving ground: LSP-Zero with the verifier, LSP with the self-reward (and
LoRA), and kill-and-resume equality against an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import REPO, tiny_overrides

from sparring.config import load_config
from sparring.tasks import solve

CONFIG = str(REPO / "configs" / "lsp" / "tiny.yaml")
SELF_REWARD = str(REPO / "configs" / "lsp" / "tiny-self-reward.yaml")

def overrides(ground, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(ground, out, data=False) + [
        "eval.num_examples=8", "lsp.steps=4", "lsp.num_queries=2", "lsp.answers_per_query=2",
        "lsp.query_max_new_tokens=12", "lsp.answer_max_new_tokens=8", "lsp.eval_every=2",
        "lsp.save_every=2", "lsp.sample_every=2", *extra,
    ]


def lsp_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "lsp"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_lsp_zero_end_to_end_with_the_verifier(tiny_ground, tmp_path):
    from sparring.algorithms.lsp import run

    out = tmp_path / "zero"
    cfg = load_config(CONFIG, overrides(tiny_ground, out, "lsp.reward.invalid_query_reward=1.0",
                                        "generation.on_truncated=penalize"))
    rows = run(cfg)
    metrics = lsp_rows(out)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    first = metrics[0]
    assert first["lsp/kl_solver"] == 0.0 and first["lsp/kl_challenger"] == 0.0  # θ = θ_Ref at step 1
    for r in metrics:
        assert 0.0 <= r["lsp/invalid_query_frac"] <= 1.0
        for key in ("lsp/reward", "lsp/solver_reward", "lsp/challenger_reward", "lsp/query_length",
                    "lsp/answer_length", "lsp/answer_truncated_frac", "lsp/query_truncated_frac", "grad_norm",
                    "lr", "loss"):
            assert key in r
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    for s in samples:  # unparseable (or, with penalize, truncated) queries: every answer gets invalid_query_reward
        if solve(s["query"]) is None:
            assert s["rewards"] == [1.0, 1.0]
    assert [r["step"] for r in rows] == [0, 2, 4] and all("exact_match" in r for r in rows)
    assert "| 4 |" in (out / "results.md").read_text() and (out / "plot.png").stat().st_size > 0
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert {"step2", "final"} <= set(stages) and not (out / "checkpoints").exists()
    # a rerun of a finished run redoes nothing
    again = run(cfg)
    assert again == rows and lsp_rows(out) == metrics


@pytest.mark.slow
def test_lsp_self_reward_with_lora_end_to_end(tiny_ground, tmp_path, reward_dir):
    from sparring.algorithms.lsp import run

    out = tmp_path / "self"
    cfg = load_config(SELF_REWARD, overrides(
        tiny_ground, out, "lsp.steps=2", "lsp.reward.kind=function", "lsp.reward.function=lsp_test_reward:reward",
        "lsp.judge_max_new_tokens=8", "peft.r=4", "peft.alpha=8", "train.lr=0.01",
    ))
    run(cfg)
    metrics = lsp_rows(out)
    assert [r["step"] for r in metrics] == [1, 2]
    for r in metrics:
        # the tiny model cannot write "<Score>k</Score>": its grades fall back to 0 and are counted
        assert r["lsp/quality_fallback_frac"] > 0.0
        assert 0.0 <= r["lsp/quality_reward"] <= 7.0
    assert metrics[0]["lsp/kl_solver"] == 0.0  # LoRA starts at B = 0: the policy is exactly π_Ref
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["quality"]) == 2 for s in samples)
    trained, initial = weights(out / "model"), weights(Path(tiny_ground["model"]))
    assert set(trained) == set(initial)  # adapters merged: a plain model again
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparring.cli", "run", CONFIG, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tiny_ground, tmp_path, reward_dir):
    env = {**os.environ, "PYTHONPATH": str(reward_dir), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    extra = ["lsp.steps=6", "lsp.reward.kind=function", "lsp.reward.function=lsp_test_reward:reward",
             "train.lr=0.01", "lsp.eval_every=3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = cli(overrides(tiny_ground, straight, *extra), env)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    proc = cli(overrides(tiny_ground, killed, *extra), env)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step-*[0-9]")):
        assert proc.poll() is None, "the run ended before a checkpoint appeared:\n" + proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "final" not in json.loads((killed / "state.json").read_text())["stages"]  # really interrupted
    proc = cli(overrides(tiny_ground, killed, *extra), env)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "resuming lsp run" in output

    a, b = weights(straight / "model"), weights(killed / "model")
    initial = weights(Path(tiny_ground["model"]))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the runs did train
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert [r["step"] for r in lsp_rows(killed)] == [1, 2, 3, 4, 5, 6]  # no duplicated rows
    assert [r["lsp/reward"] for r in lsp_rows(killed)] == pytest.approx([r["lsp/reward"] for r in lsp_rows(straight)])
    samples = [json.loads(line)["step"] for line in (killed / "samples.jsonl").read_text().splitlines()]
    assert samples == [2, 2, 4, 4, 6, 6]
