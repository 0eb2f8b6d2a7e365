"""Two CPU processes under torchrun (gloo): one job that trains, checkpoints, saves and evaluates
like a single process with twice the per-device batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, rows

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
# 25 pairs in micro-batches of 2 × 4, two per step: 2 optimizer steps with a checkpoint after the
# first, and a last micro-batch of one pair, which leaves process 1 without an example. 18 held-out
# examples in batches of 4: process 0 evaluates 3 batches, process 1 two and a stand-in.
SMALL = ["spin.iterations=1", "data.num_prompts=25", "train.grad_accum=2", "train.save_steps=1",
         "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=18", "eval.batch_size=4"]


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


def test_held_out_evaluation_is_shared_by_both_processes_with_one_process_scores(two_process_run, one_process_run):
    out, proc = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # θ0 is the same model and the evaluation greedy: identical scores, to the last bit.
    initial = [json.loads((run / "eval" / "initial.json").read_text()) for run in (out, one_process_run)]
    assert initial[0] == initial[1]
    # θ1 agrees to float noise (the two runs' weights differ by reduction order only).
    after = [json.loads((run / "eval" / "iter0.json").read_text()) for run in (out, one_process_run)]
    assert after[0]["exact_match"] == after[1]["exact_match"]
    assert after[0]["logps_real_per_token"] == pytest.approx(after[1]["logps_real_per_token"], abs=1e-5)
    assert [r["label"] for r in rows(out / "metrics.jsonl") if r["kind"] == "eval"] == ["initial", "iter0"]


def test_evaluation_shares_out_every_batch_once_and_every_process_gets_the_scores(tiny_ground, monkeypatch):
    """Two ranks as two threads, all_gather_object as a barrier: the shares and the scores."""
    import accelerate.utils

    from sparring.config import EvalConfig, ModelConfig
    from sparring.evaluation import evaluate, load_eval_set
    from sparring.modeling import load_model, load_tokenizer

    cfg = EvalConfig(source=tiny_ground["eval"], num_examples=18, batch_size=4, max_new_tokens=8)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    data = load_eval_set(cfg, tokenizer, 96)
    models = [load_model(ModelConfig(name_or_path=tiny_ground["model"])) for _ in range(3)]
    barrier, shares, scores = threading.Barrier(2, timeout=120), [None, None], [None, None]
    rank_of: dict[int, int] = {}

    def gather(rows):
        shares[rank_of[threading.get_ident()]] = rows
        barrier.wait()
        return shares[0] + shares[1]

    def run(rank):
        rank_of[threading.get_ident()] = rank
        scores[rank] = evaluate(models[rank], tokenizer, data, cfg, SimpleNamespace(process_index=rank, num_processes=2))

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert scores[0] == scores[1] == evaluate(models[2], tokenizer, data, cfg)
    answered = [{r["index"] for r in share if "correct" in r} for share in shares]
    assert not answered[0] & answered[1] and answered[0] | answered[1] == set(range(18))
    scored = [sorted(r["batch"] for r in share if "logp" in r) for share in shares]
    assert scored == [[0, 2, 4], [1, 3]]  # 5 batches of ≤ 4; process 1 also ran a stand-in, dropped
