"""LSP on two CPU processes under torchrun (gloo): the run equals a one-process run (samples, weights,
logged metrics), every rollout, reward and self-judge batch is done by exactly one process, and a run
whose two ranks are SIGKILLed after a checkpoint resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import REPO
from tests.integration.helpers import assert_same_weights, rows, weights, write_reward_module
from tests.integration.test_lsp import CONFIG, SELF_REWARD, lsp_rows, overrides
from tests.integration.test_multiprocess import ENV, torchrun_cmd

from sparring.cli import main

pytestmark = pytest.mark.slow
# 4 steps, a checkpoint after step 2. N = 3 queries, G = 2 answers: generation batches of 2 give two
# challenger batches and three solver batches (process 0 takes two of each, process 1 the rest);
# micro-batches of 1 per process: the challenger's last micro-batch leaves process 1 a stand-in.
# 8 held-out examples in batches of 2, shared out too.
SMALL = ["lsp.num_queries=3", "generation.batch_size=2", "train.batch_size=1", "eval.batch_size=2",
         "lsp.sample_every=1", "lsp.reward.kind=function", "lsp.reward.function=lsp_test_reward:reward",
         "train.lr=0.01"]
# Float noise only: the two runs' gradients differ by the order of the sums (per-process, then all-reduce).
ATOL = 1e-5


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return write_reward_module(tmp_path_factory.mktemp("reward_pkg"))


def env_with(reward_dir: Path) -> dict[str, str]:
    return {**ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(reward_dir)])}


def args_for(ground, out: Path, config: str = CONFIG, *extra: str) -> list[str]:
    return ["run", config, *overrides(ground, out, *SMALL, *extra)]


def torchrun(args: list[str], reward_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, 2), capture_output=True, text=True, env=env_with(reward_dir), cwd=REPO,
                          timeout=300)


def failure(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def two_process_run(tiny_ground, reward_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("lsp-two") / "run"
    return out, torchrun(args_for(tiny_ground, out), reward_dir)


@pytest.fixture(scope="module")
def one_process_run(tiny_ground, reward_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lsp-one") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(reward_dir))
        assert main(args_for(tiny_ground, out)) == 0
    return out


def test_two_processes_run_lsp_like_one_process(two_process_run, one_process_run, tiny_ground):
    two, proc = two_process_run
    one = one_process_run
    assert proc.returncode == 0, failure(proc)
    assert "processes: 2 (multi_cpu" in proc.stdout and proc.stdout.count("starting lsp run") == 1
    # The same queries, answers, rewards and advantages at every step (each batch seeded by its index).
    assert [s["step"] for s in rows(two / "samples.jsonl")] == [t for t in (1, 2, 3, 4) for _ in range(3)]
    assert rows(two / "samples.jsonl") == rows(one / "samples.jsonl")
    assert_same_weights(two / "model", one / "model", atol=ATOL)
    a, b, initial = weights(two / "model"), weights(one / "model"), weights(Path(tiny_ground["model"]))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the runs did train
    print("max |θ(2 processes) − θ(1 process)|:", max((a[k] - b[k]).abs().max().item() for k in a))
    logged = [lsp_rows(two), lsp_rows(one)]
    assert [r["step"] for r in logged[0]] == [r["step"] for r in logged[1]] == [1, 2, 3, 4]
    # The weights differ by ~1e-6 after step 1, the gradient norm by ~3e-6 relative. Clipping and Adam
    # hide a wrong loss scale from the weights; the logged (unclipped) grad_norm shows it.
    for r2, r1 in zip(*logged):
        assert r2.keys() == r1.keys()
        for key in (k for k in r1 if not k.startswith("perf/")):
            close = r1[key] if isinstance(r1[key], str) else pytest.approx(r1[key], rel=ATOL, abs=ATOL)
            assert r2[key] == close, (r1["step"], key)
    assert logged[0][0]["lsp/kl_solver"] == 0.0 and logged[0][0]["lsp/kl_challenger"] == 0.0  # θ = θ_Ref at step 1
    # Held-out evaluation: shared out by the two processes, with one process's scores.
    for label in ("step0", "step2", "step4"):
        scores = [json.loads((run / "eval" / f"{label}.json").read_text()) for run in (two, one)]
        assert scores[0]["exact_match"] == scores[1]["exact_match"], label
        assert scores[0]["logps_real_per_token"] == pytest.approx(scores[1]["logps_real_per_token"], abs=ATOL)


def test_self_reward_with_lora_on_two_processes_runs_like_one_process(tiny_ground, reward_dir, tmp_path, monkeypatch):
    """LSP proper: π_Ref's grades shared out too, and LoRA under DDP (π_Ref = the adapters disabled)."""
    extra = ["lsp.steps=2", "lsp.judge_max_new_tokens=8", "peft.r=4", "peft.alpha=8"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(args_for(tiny_ground, two, SELF_REWARD, *extra), reward_dir)
    assert proc.returncode == 0, failure(proc)
    assert "processes: 2 (multi_cpu" in proc.stdout
    monkeypatch.syspath_prepend(str(reward_dir))
    assert main(args_for(tiny_ground, one, SELF_REWARD, *extra)) == 0
    samples = rows(two / "samples.jsonl")
    assert samples == rows(one / "samples.jsonl") and all(len(s["quality"]) == 2 for s in samples)
    assert_same_weights(two / "model", one / "model", atol=ATOL)
    trained, initial = weights(two / "model"), weights(Path(tiny_ground["model"]))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # the adapters (merged) moved θ0
    logged = [lsp_rows(two), lsp_rows(one)]
    for key in ("loss", "lsp/kl_solver", "lsp/solver_logps", "lsp/quality_reward", "lsp/quality_fallback_frac"):
        assert [r[key] for r in logged[0]] == pytest.approx([r[key] for r in logged[1]], rel=ATOL, abs=ATOL), key


def test_every_rollout_reward_and_judge_batch_is_done_once_across_processes(monkeypatch):
    """Two ranks as two threads (all_gather_object as a barrier) through sample_rollouts, score_rewards
    and the self-judge: each batch runs on exactly one rank, and both get one process's results."""
    import accelerate.utils

    import sparring.algorithms.lsp.rollouts as rollouts
    from sparring.algorithms.lsp.rollouts import Reference, judge_generate, sample_rollouts, score_rewards
    from sparring.config import LspConfig, LspRewardConfig
    from sparring.generation.base import Completion
    from sparring.rewards import RewardBatch, SelfJudge
    from sparring.tasks import build_tokenizer

    tok = build_tokenizer()
    lsp = LspConfig(num_queries=5, answers_per_query=3, challenger_prompt="Ask.")
    barrier, shares = threading.Barrier(2, timeout=60), [None, None]
    rank_of: dict[int, int] = {}
    done: dict[str, list[list]] = {"generate": [[], [], []], "reward": [[], [], []]}

    class Recorder:  # a deterministic function of (prompt, seed), like a seeded sampler
        def generate(self, prompts, params, seed):
            done["generate"][rank_of[threading.get_ident()]].append(seed)
            return [Completion(f"{sum(p)}-{seed % 97}", [3, 4], True) for p in prompts]

    def reward(queries, answers):
        done["reward"][rank_of[threading.get_ident()]].append(tuple(answers))
        return RewardBatch([float(len(a)) for a in answers], [True] * len(answers))

    def gather(objects):
        rank = rank_of[threading.get_ident()]
        if rank == 2:  # the one-process run
            return objects
        shares[rank] = objects
        barrier.wait()
        out = shares[0] + shares[1]
        barrier.wait()  # both have read the shares before the next gather overwrites them
        return out

    monkeypatch.setattr(rollouts, "HFGenerator", lambda model, tokenizer: Recorder())
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    results = [None, None, None]

    def run(rank):
        rank_of[threading.get_ident()] = rank
        acc = SimpleNamespace(process_index=rank % 2, num_processes=1 if rank == 2 else 2)
        r = sample_rollouts(torch.nn.Linear(1, 1), tok, lsp, seed=3, step=2, batch_size=4, accelerator=acc)
        scored = score_rewards(reward, r, LspRewardConfig(), batch_size=4, accelerator=acc)
        judge = SelfJudge(judge_generate(Reference(copy=torch.nn.Linear(1, 1)), tok, lsp, 4, accelerator=acc))
        graded = judge([q for q in r.queries for _ in range(3)], r.answers)
        results[rank] = (r, scored.rewards.tolist(), graded.completions)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == results[1] == results[2]  # both ranks hold the whole step, as one process does
    # 5 queries (2 batches of 4), 15 answers (4 batches), 15 grades (4 batches): 10 generate calls, batch k
    # by rank k mod 2 (5 each); 15 rewards in 4 batches (2 each).
    gen, rew = done["generate"], done["reward"]
    assert len(gen[2]) == 10 and sorted(gen[0] + gen[1]) == sorted(gen[2]) and len(gen[0]) == len(gen[1]) == 5
    assert len(rew[2]) == 4 and sorted(rew[0] + rew[1]) == sorted(rew[2]) and len(rew[0]) == len(rew[1]) == 2


def test_both_ranks_sigkilled_after_a_checkpoint_resume_to_the_uninterrupted_weights(
    two_process_run, tiny_ground, reward_dir, tmp_path
):
    reference, proc = two_process_run
    assert proc.returncode == 0, failure(proc)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # A session of its own, so that one killpg reaches torchrun and both ranks.
    killed = subprocess.Popen(torchrun_cmd(args_for(tiny_ground, out), 2), stdout=log.open("w"),
                              stderr=subprocess.STDOUT, env=env_with(reward_dir), cwd=REPO, start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step-*[0-9]")):
        assert killed.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert "final" not in json.loads((out / "state.json").read_text())["stages"]  # it died inside training
    again = torchrun(args_for(tiny_ground, out), reward_dir)
    assert again.returncode == 0, failure(again)
    assert "resuming lsp run" in again.stdout
    assert_same_weights(out / "model", reference / "model", atol=0)  # bit-identical
    assert [r["step"] for r in lsp_rows(out)] == [1, 2, 3, 4]  # no step logged twice
    assert rows(out / "samples.jsonl") == rows(reference / "samples.jsonl")


# The CLI with rank 1's first solver row of step 3 made NaN (5 loss calls a step: 3 solver micro-batches
# of 2 × 1 rows, 2 challenger ones); rank 1's first solver row is answer 1, that of query 0.
POISON = textwrap.dedent("""
    import math, os, sys
    import torch
    import sparring.algorithms.lsp.rollouts as rollouts
    from sparring.cli import main

    real, calls = rollouts.reinforce_loss, []

    def poisoned(*args, **kwargs):
        out, _ = real(*args, **kwargs), calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 11:
            return out._replace(loss=out.loss * torch.tensor([math.nan] + [1.0] * (len(out.loss) - 1)))
        return out

    rollouts.reinforce_loss = poisoned
    sys.exit(main(sys.argv[1:]))
""")


def test_a_nonfinite_row_on_one_rank_stops_both_and_the_message_names_it(tiny_ground, reward_dir, tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    cmd = torchrun_cmd([str(script), *args_for(tiny_ground, tmp_path / "run")], 2, module=None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with(reward_dir), cwd=REPO, timeout=300)
    assert proc.returncode != 0
    # Rank 0 had no bad row: it names rank 1's (gathered), and neither rank blames the gradient norm.
    output = proc.stdout + proc.stderr
    assert "LSP step 3 of 4: a non-finite solver loss on the answers to queries [0] (answers [1], i·G + j)" in output
    assert "non-finite gradient norm" not in output, failure(proc)
    assert [r["step"] for r in lsp_rows(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_models_are_refused_with_a_config_error(kind):
    from sparring.algorithms.lsp import check_data_parallel
    from sparring.config import ConfigError

    with pytest.raises(ConfigError, match=f"data-parallel \\(DDP\\) processes, not under {kind}"):
        check_data_parallel(SimpleNamespace(distributed_type=SimpleNamespace(name=kind)))
    check_data_parallel(SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_CPU")))  # DDP runs
