"""Two CPU processes under torchrun (gloo): one job that trains, checkpoints, saves and evaluates
like a single process with twice the per-device batch, shares out every generation and log-prob row
once, stops or skips a step on every rank together, and resumes after both ranks are SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, rows

from sparring.cli import main
from sparring.config import TrainConfig
from sparring.training.loop import plan_steps

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
# 25 pairs in micro-batches of 2 × 4, two per step: 2 optimizer steps with a checkpoint after the
# first, and a last micro-batch of one pair, which leaves process 1 without an example. 18 held-out
# examples in batches of 4: process 0 evaluates 3 batches, process 1 two and a stand-in.
SMALL = ["spin.iterations=1", "data.num_prompts=25", "train.grad_accum=2", "train.save_steps=1",
         "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=18", "eval.batch_size=4"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def torchrun_cmd(args: list[str], processes: int, module: str | None = "sparring.cli") -> list[str]:
    """torch.distributed.run of ``-m module ARGS`` (or of a script); --standalone picks a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            *(["-m", module] if module else []), *args]


def torchrun(args: list[str], processes: int, module: str | None = "sparring.cli") -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, processes, module), capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)


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

    cfg = EvalConfig(source=tiny_ground["eval"], num_examples=18, batch_size=4, max_new_tokens=8, verifier="proving_ground")
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
    answered = [{r["index"] for r in share if "score" in r} for share in shares]
    assert not answered[0] & answered[1] and answered[0] | answered[1] == set(range(18))
    scored = [sorted(r["batch"] for r in share if "logp" in r) for share in shares]
    assert scored == [[0, 2, 4], [1, 3]]  # 5 batches of ≤ 4; process 1 also ran a stand-in, dropped


# T-SPIN and TPAW over two iterations (T-SPIN's history term and TPAW's two-player team start at
# iteration 1), on the SPIN test's pairs and batches, with a smaller held-out set.
OTHERS = [s for s in SMALL if not s.startswith(("spin.", "eval.num_examples"))] + ["eval.num_examples=4"]
# TPAW's α_j = η where P_j(y) ≤ 0 is a step in the loss, and P_j(y) starts each round at 0 ± float
# noise: rows flip between η and 1 on reduction-order noise (weights then differ ~1e-4), so η = 1 here.
EXTRA = {"tspin": [], "tpaw": ["tpaw.target_weight_eta=1.0"]}


@pytest.mark.parametrize("method", ["tspin", "tpaw"])
def test_tspin_and_tpaw_on_two_processes_train_like_one_process_with_twice_the_batch(tiny_ground, tmp_path, method):
    config = str(REPO / "configs" / method / "tiny.yaml")
    args = [*OTHERS, f"{method}.iterations=2", *EXTRA[method]]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(["run", config, *tiny_overrides(tiny_ground, two), *args, "train.batch_size=4"], processes=2)
    rank_errors = [line for line in proc.stderr.splitlines() if "rank1" in line or "error" in line.lower()]
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(rank_errors)[-6000:]
    assert "processes: 2 (multi_cpu" in proc.stdout
    assert main(["run", config, *tiny_overrides(tiny_ground, one), *args, "train.batch_size=8"]) == 0
    for t in (0, 1):
        folder = f"iter_{t:03d}"
        assert rows(two / folder / "generated.jsonl") == rows(one / folder / "generated.jsonl")
        # Float noise only (reduction order): 1e-6 on weights of magnitude ~0.1–1, as for SPIN.
        assert_same_weights(two / folder / "model", one / folder / "model", atol=1e-6)
    train = [[r for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] for run in (two, one)]
    assert [(r["iteration"], r["step"]) for r in train[0]] == [(r["iteration"], r["step"]) for r in train[1]]
    assert [r["loss"] for r in train[0]] == pytest.approx([r["loss"] for r in train[1]], abs=1e-6)


def test_generation_and_logprob_passes_cover_every_row_once_across_processes(tmp_path, monkeypatch):
    """Two ranks as two threads (a barrier for wait_for_everyone) through the real sharding code:
    each row is generated and scored by exactly one rank, and the chunk files hold each row once."""
    import sparring.training.precompute as precompute
    from sparring.generation import SamplingParams, generate_responses
    from sparring.generation.base import Completion

    n, barrier = 21, threading.Barrier(2, timeout=60)
    done: dict[str, list[set[int]]] = {"generated": [set(), set()], "scored": [set(), set()]}
    rank_of: dict[int, int] = {}
    prompts = [[5] * (1 + i % 4) + [i] for i in range(n)]  # the last id names the prompt

    class Recorder:
        def generate(self, batch, params, seed):
            done["generated"][rank_of[threading.get_ident()]] |= {p[-1] for p in batch}
            return [Completion(str(p[-1]), [7], True) for p in batch]

    def logps(model, seqs, average=False):
        ids = (seqs.input_ids * seqs.response_mask).sum(1).tolist()  # each item's one response id names it
        done["scored"][rank_of[threading.get_ident()]] |= set(ids)
        return torch.tensor(ids, dtype=torch.float64)

    monkeypatch.setattr(precompute, "sequence_logps", logps)
    results = [None, None]

    def rank(r):
        rank_of[threading.get_ident()] = r
        acc = SimpleNamespace(process_index=r, num_processes=2, is_main_process=r == 0, wait_for_everyone=barrier.wait)
        gen = generate_responses(Recorder(), prompts, SamplingParams(), folder=tmp_path / "gen", seed=1, batch_size=4,
                                 accelerator=acc)
        scores = precompute.score_sequences(torch.nn.Linear(1, 1), [(p, [i]) for i, p in enumerate(prompts)], pad_id=0,
                                            batch_size=4, folder=tmp_path / "logps", accelerator=acc)
        results[r] = (gen, scores)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for kind in ("generated", "scored"):
        mine = done[kind]
        assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == set(range(n)), kind
    for folder in ("gen", "logps"):
        indices = [r["index"] for chunk in sorted((tmp_path / folder).glob("chunk-*.jsonl")) for r in rows(chunk)]
        assert sorted(indices) == list(range(n)), folder  # every row once, none twice
    assert results[0] == results[1]  # both ranks read back the same rows, in order
    assert [c["text"] for c in results[0][0]] == [str(i) for i in range(n)] and results[0][1] == list(range(n))


def test_both_ranks_sigkilled_mid_training_then_two_processes_resume_to_the_uninterrupted_weights(
    two_process_run, tiny_ground, tmp_path
):
    reference, proc = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, log = tmp_path / "run", tmp_path / "log.txt"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "train.batch_size=4"]
    # A session of its own, so that one killpg reaches torchrun and both ranks.
    killed = subprocess.Popen(torchrun_cmd(args, 2), stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                              start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("iter_000/checkpoints/step-*")):
        assert killed.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert "iter0" not in json.loads((out / "state.json").read_text())["stages"]  # it died inside training
    again = torchrun(args, processes=2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming spin run" in again.stdout  # the dead main process's lock did not block the rerun
    assert_same_weights(out / "iter_000" / "model", reference / "iter_000" / "model", atol=1e-6)
    steps = [r["step"] for r in rows(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2]  # resumed training never logs a step twice


# Each rank runs the shared loop on a toy model under DDP (gloo). Rank 1 alone sees a NaN loss at
# step 2, and rank 1 alone is sent SIGUSR1 during step 4.
AGREEMENT = textwrap.dedent("""
    import json, math, os, signal, sys
    from dataclasses import replace
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    from sparring.config import TrainConfig
    from sparring.losses import spin_loss
    from sparring.training import MetricsLogger, train
    from sparring.training.loop import NonFiniteLoss, Preempted
    from tests.unit.test_training_loop import collate, records

    class Linear(torch.nn.Module):  # one forward for real and generated: DDP wants one per backward
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.w(x).squeeze(-1)

    out, acc = Path(sys.argv[1]), Accelerator(cpu=True)
    rank, calls = acc.process_index, []

    def loss_step(model, batch):
        calls.append(1)
        real, gen, o_r, o_g = batch[:4]
        lr, lg = model(torch.cat([real, gen])).chunk(2)
        loss = spin_loss(lr, lg, o_r, o_g, scale=0.5)
        if rank == 1 and len(calls) == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        if rank == 1 and len(calls) == 2:
            loss = loss._replace(loss=loss.loss * torch.tensor([math.nan, 1.0]))
        return loss

    cfg = TrainConfig(optimizer="adamw", lr=1e-2, epochs=1, batch_size=2, save_steps=100, on_nonfinite="skip_step")
    result = {}
    for name, c in [("skip", cfg), ("error", replace(cfg, on_nonfinite="error"))]:
        calls.clear()
        logger = MetricsLogger(out / f"{name}.jsonl", None, enabled=acc.is_main_process)
        try:
            train(Linear(), records(), collate=collate, loss_step=loss_step, cfg=c, accelerator=acc,
                  folder=out / name, logger=logger, log_fields={"iteration": 0})
        except (Preempted, NonFiniteLoss) as err:
            result[name] = f"{type(err).__name__}: {err}"
        result[name + "_calls"] = len(calls)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # gloo's threads end before the interpreter (else: SIGABRT at exit)
""")


def test_every_rank_stops_and_skips_at_the_same_step_when_only_one_rank_has_cause(tmp_path):
    script = tmp_path / "agreement.py"
    script.write_text(AGREEMENT)
    proc = torchrun([str(script), str(tmp_path)], processes=2, module=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # skip_step: both ranks skipped step 2 and both stopped after step 4, though rank 0 had neither cause.
    assert ranks[0]["skip"] == ranks[1]["skip"]
    assert ranks[0]["skip"].startswith("Preempted: stopped by a signal after iteration 0 step 4 of 6")
    assert ranks[0]["skip_calls"] == ranks[1]["skip_calls"] == 4
    assert [r["skipped_steps"] for r in rows(tmp_path / "skip.jsonl")] == [0, 1, 1, 1]
    assert [p.name for p in (tmp_path / "skip" / "checkpoints").iterdir()] == ["step-00000004"]
    # error: both stop at step 2 with the same message, naming the record rank 1 ran.
    record = plan_steps(24, TrainConfig(epochs=1, batch_size=2), 2)[1][0][1]  # step 2's micro-batch, rank 1's first record
    assert ranks[0]["error"] == ranks[1]["error"]
    assert f"iteration 0 step 2 of 6: a non-finite loss on training records [{record}]" in ranks[0]["error"]
    assert ranks[0]["error_calls"] == ranks[1]["error_calls"] == 2
    assert not (tmp_path / "error" / "checkpoints").exists()



@pytest.mark.parametrize(("name", "expected"), [
    ("ddp.yaml", {}),
    ("fsdp2.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
                    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}),
    ("deepspeed_zero2.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    ("deepspeed_zero3.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                              "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
                              "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}),
])
def test_accelerate_profiles_pass_accelerates_own_config_and_launch_checks(name, expected):
    """Read and validated as `accelerate launch --config_file` does, up to the environment it would
    give the processes (no GPU, DeepSpeed or launch needed)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = str(REPO / "configs" / "accelerate" / name)
    assert ClusterConfig.from_yaml_file(path).num_processes == 8  # unknown keys would raise here
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", path, "-m", "sparring.cli", "run"]))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        assert args.multi_gpu or args.use_fsdp
        env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert {k: env.get(k) for k in expected} == expected


def test_lora_on_two_processes_trains_like_one_process_with_twice_the_batch(tiny_ground, tmp_path):
    """LoRA under DDP (issue: LoRA for every method, multi-process): the adapters' gradients are
    all-reduced like full weights, so θ1 (adapters merged) equals a one-process run's with 2× the batch."""
    lora = ["peft.r=4", "peft.alpha=8", "train.lr=5e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(["run", CONFIG, *tiny_overrides(tiny_ground, two), *SMALL, *lora, "train.batch_size=4"], processes=2)
    rank_errors = [line for line in proc.stderr.splitlines() if "rank1" in line or "error" in line.lower()]
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(rank_errors)[-6000:]
    assert "processes: 2 (multi_cpu" in proc.stdout
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, one), *SMALL, *lora, "train.batch_size=8"]) == 0
    assert rows(two / "iter_000" / "generated.jsonl") == rows(one / "iter_000" / "generated.jsonl")
    assert_same_weights(two / "iter_000" / "model", one / "iter_000" / "model", atol=1e-6)
    from tests.integration.helpers import weights

    moved, theta0 = weights(two / "iter_000" / "model"), weights(Path(tiny_ground["model"]))
    assert moved.keys() == theta0.keys()  # a full model: the adapters merged, none left
    assert any(not torch.allclose(moved[k], theta0[k], atol=1e-6) for k in moved)  # and they did move θ0
    train = [[r for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] for run in (two, one)]
    assert [r["step"] for r in train[0]] == [r["step"] for r in train[1]] == [1, 2]
    assert [r["loss"] for r in train[0]] == pytest.approx([r["loss"] for r in train[1]], abs=1e-6)
