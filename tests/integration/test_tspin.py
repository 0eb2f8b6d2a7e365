"""T-SPIN end to end on a tiny model: β schedule, reference-free training, y₀ drawn once, kill and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, install_probe, kill_when, rows, sha, spawn

import sparring.stages
import sparring.training
import sparring.training.precompute
from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "tspin" / "tiny.yaml")
SMALL = ["data.num_prompts=24", "generation.max_new_tokens=10", "generation.batch_size=8", "train.batch_size=4",
         "train.save_steps=2", "eval.num_examples=16", "eval.max_new_tokens=10"]


class Probe:
    """Records every model load, generation and forward pass of an in-process run."""

    def __init__(self, out: Path):
        self.out = out
        self.loads: list[tuple[object, int]] = []  # (path, id(model))
        self.generations: list[tuple[int, str, int]] = []  # (t, name, id(model))
        self.forwards: list[tuple[int, bool, int, bool]] = []  # (id(model), grad on, rows, inside train())
        self.proto_sha_at_iteration_1: str | None = None
        self.training = False

    def load_model(self, real):
        def load(cfg, path=None, **kwargs):
            model = real(cfg, path, **kwargs)
            self.loads.append((path, id(model)))
            model.register_forward_pre_hook(self._hook, with_kwargs=True)
            return model
        return load

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.forwards.append((id(module), torch.is_grad_enabled(), ids.shape[0], self.training))

    def generate(self, real):
        def gen(s, model, t, name, cfg=None):
            if (t, name) == (1, "generated"):
                self.proto_sha_at_iteration_1 = sha(self.out / "iter_000" / "proto.jsonl")
            self.generations.append((t, name, id(model)))
            return real(s, model, t, name, cfg)
        return gen

    def train(self, real):
        def train(model, records, **kwargs):
            self.training, self.policy = True, id(model)
            try:
                return real(model, records, **kwargs)
            finally:
                self.training = False
        return train


def _no_reference_pass(*args, **kwargs):
    raise AssertionError("T-SPIN must not run a reference / opponent log-prob pass")


@pytest.fixture(scope="module")
def probed_run(tiny_ground, tmp_path_factory) -> tuple[Path, Probe]:
    out = tmp_path_factory.mktemp("tspin") / "run"
    probe = Probe(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparring.training, "score_sequences", _no_reference_pass)
        mp.setattr(sparring.training.precompute, "score_sequences", _no_reference_pass)
        install_probe(mp, probe)
        assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    return out, probe


def test_two_iterations_log_everywhere_and_follow_the_history_weight_schedule(probed_run):
    out, _ = probed_run
    state = json.loads((out / "state.json").read_text())["stages"]
    for stage in ["iter0/proto", "iter0/generated", "iter0", "iter1/generated", "iter1"]:
        assert stage in state, stage
    assert "iter1/proto" not in state
    assert [state[f"iter{t}"]["history_weight"] for t in (0, 1)] == [0.0, 0.1]
    assert (out / "plot.png").stat().st_size > 1000 and list((out / "tb").glob("events.out.tfevents.*"))
    assert "held-out exact match" in (out / "results.md").read_text()
    metrics = rows(out / "metrics.jsonl")
    assert [r["label"] for r in metrics if r["kind"] == "eval"] == ["initial", "iter0", "iter1"]
    train_rows = [r for r in metrics if r["kind"] == "train"]
    assert {"tspin/current_loss", "tspin/history_loss", "tspin/history_margin", "rewards/margins"} <= set(train_rows[0])
    # loss = ℓ(α(a−b)) + β_t·ℓ(α(b−c)) with β_0 = 0, β_1 = 0.1: the schedule reaches the loss.
    for r in train_rows:
        beta = 0.0 if r["iteration"] == 0 else 0.1
        assert r["loss"] == pytest.approx(r["tspin/current_loss"] + beta * r["tspin/history_loss"], abs=1e-5)
    assert any(r["tspin/history_loss"] > 1e-3 for r in train_rows if r["iteration"] == 1)


def test_training_runs_only_policy_forwards_of_one_row_per_prompt_with_its_three_responses(probed_run):
    """Reference-free: score_sequences raises if called, and train() sees only the policy's forwards, each
    batch one row per prompt holding y, y′ and y₀ (train.share_prompt, the default)."""
    out, probe = probed_run
    assert [p for p, _ in probe.loads] == [None, None, out / "iter_000" / "model"]  # eval θ_0, θ_0, θ_1
    during = [f for f in probe.forwards if f[3]]
    assert len(during) == 2 * 24 // 4  # one forward per batch: 6 steps per iteration, 2 iterations
    policies = {model for _, model in probe.loads[1:]}
    assert {model for model, *_ in during} <= policies
    assert all(grad and n == 4 for _, grad, n, _ in during)  # real + generated + proto of 4 prompts in one pass
    trained = [model for model, grad, _, _ in probe.forwards if grad]
    assert len(trained) == len(during)  # no gradient-carrying forward outside train()


def test_proto_responses_are_sampled_once_by_theta0_and_never_change(probed_run):
    out, probe = probed_run
    base_model = probe.loads[1][1]  # θ_0 of iteration 0
    assert [(t, name) for t, name, _ in probe.generations] == [(0, "proto"), (0, "generated"), (1, "generated")]
    assert probe.generations[0][2] == base_model
    proto = out / "iter_000" / "proto.jsonl"
    assert probe.proto_sha_at_iteration_1 == sha(proto)  # untouched after iteration 0
    source = json.loads((out / "iter_000" / "proto.source.json").read_text())
    assert source["iteration"] == 0 and source["file"] == "iter_000/proto.jsonl"
    protos = [r["text"] for r in rows(proto)]
    first = [r["text"] for r in rows(out / "iter_000" / "generated.jsonl")]
    assert protos != first  # a separate sample set of θ_0, not iteration 0's y′
    for t in (0, 1):
        assert [r["proto"] for r in rows(out / f"iter_{t:03d}" / "triplets.jsonl")] == protos


def test_sigkill_then_resume_gives_the_same_weights_and_the_same_proto_file(probed_run, tiny_ground, tmp_path):
    reference, _ = probed_run
    out = tmp_path / "killed"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]
    log = tmp_path / "log.txt"
    kills, seen = 0, set()
    for pattern in ["iter_000/checkpoints/step-*", "iter_001/checkpoints/step-*"]:
        kills += kill_when(spawn(args, log), pattern, out)
        assert "iter1" not in json.loads((out / "state.json").read_text())["stages"], log.read_text()[-2000:]
        seen.add(sha(out / "iter_000" / "proto.jsonl"))
    assert kills == 2, log.read_text()[-2000:]
    final = spawn(args, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert seen == {sha(out / "iter_000" / "proto.jsonl")} == {sha(reference / "iter_000" / "proto.jsonl")}
    assert_same_weights(out / "iter_001" / "model", reference / "iter_001" / "model")
