"""TPAW end to end on a tiny model: team sizes, reused rounds, team log-probs, memory discipline, resume."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, install_probe, kill_when, rows, sha, spawn

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "tpaw" / "tiny.yaml")
N = 16  # prompts
SMALL = [f"data.num_prompts={N}", "generation.max_new_tokens=10", "generation.batch_size=8", "train.batch_size=4",
         "train.save_steps=2", "train.logprob_batch_size=8", "eval.num_examples=16", "eval.max_new_tokens=10"]


class Probe:
    """Counts live models at every load and at the start of training; records generations."""

    def __init__(self, out: Path):
        self.out = out
        self.live: list[weakref.ref] = []
        self.loads: list[tuple[object, int]] = []  # (path, models alive once it is loaded)
        self.alive_in_training: list[int] = []
        self.generations: list[tuple[int, str]] = []
        self.first_set_sha: list[str] = []  # iter_000/generated.jsonl when each round generates

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.live)

    def load_model(self, real):
        def load(cfg, path=None, **kwargs):
            # Count the models still reachable: an unreachable one is only waiting for the cyclic GC
            # (evaluate_stage's own model can be, depending on when the collector last ran).
            gc.collect()
            model = real(cfg, path, **kwargs)
            self.live.append(weakref.ref(model))
            self.loads.append((path, self.alive()))
            return model
        return load

    def generate(self, real):
        def gen(s, model, t, name, cfg=None):
            self.generations.append((t, name))
            if t > 0:
                self.first_set_sha.append(sha(self.out / "iter_000" / "generated.jsonl"))
            return real(s, model, t, name, cfg)
        return gen

    def train(self, real):
        def train(model, records, **kwargs):
            gc.collect()
            self.alive_in_training.append(self.alive())
            return real(model, records, **kwargs)
        return train


@pytest.fixture(scope="module")
def probed_run(tiny_ground, tmp_path_factory) -> tuple[Path, Probe]:
    out = tmp_path_factory.mktemp("tpaw") / "run"
    probe = Probe(out)
    gc.collect()
    with pytest.MonkeyPatch.context() as mp:
        install_probe(mp, probe)
        assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    return out, probe


def test_team_grows_one_two_three_and_every_player_is_logged(probed_run):
    out, _ = probed_run
    state = json.loads((out / "state.json").read_text())["stages"]
    teams = [json.loads((out / f"iter_{t:03d}" / "team.json").read_text()) for t in range(3)]
    assert [t["players"] for t in teams] == [[0], [1, 0], [2, 1, 0]]  # column 0 = θ_t
    assert [state[f"iter{t}"]["rows"] for t in range(3)] == [N, 2 * N, 3 * N]  # D_t ∪ D_{t−1} ∪ D_{t−2}
    assert [sorted(k for k in state if k.startswith(f"iter{t}/team")) for t in range(3)] == [
        ["iter0/team0"], ["iter1/team0", "iter1/team1"], ["iter2/team0", "iter2/team1", "iter2/team2"]]
    metrics = rows(out / "metrics.jsonl")
    assert [r["label"] for r in metrics if r["kind"] == "eval"] == ["initial", "iter0", "iter1", "iter2"]
    train_rows = [r for r in metrics if r["kind"] == "train"]
    for t, size in enumerate((1, 2, 3)):
        mine = [r for r in train_rows if r["iteration"] == t]
        for j in range(size):
            for name in ("reward_real", "margin", "target_weighted_frac", "weight"):
                assert all(math.isfinite(r[f"tpaw/player{j}/{name}"]) for r in mine), (t, j, name)
        assert f"tpaw/player{size}/weight" not in mine[0]
        assert all(sum(r[f"tpaw/player{j}/weight"] for j in range(size)) == pytest.approx(1.0) for r in mine)
        assert all(0 <= r["tpaw/weight_entropy"] <= math.log(size) + 1e-6 for r in mine)
    # Round 0 = one player θ_0 at θ = θ_0: P_0(y) = P_0(y′) = 0, α_0 = η, the loss is log 2 (spec A.14.5).
    first = train_rows[0]
    assert first["iteration"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (out / "plot.png").stat().st_size > 1000 and list((out / "tb").glob("events.out.tfevents.*"))
    assert "held-out exact match" in (out / "results.md").read_text()


def test_older_rounds_are_reused_never_regenerated(probed_run):
    out, probe = probed_run
    assert probe.generations == [(0, "generated"), (1, "generated"), (2, "generated")]
    assert len(set(probe.first_set_sha)) == 1 and probe.first_set_sha[0] == sha(out / "iter_000" / "generated.jsonl")


def test_at_most_policy_and_one_reference_in_memory_and_only_the_policy_while_training(probed_run):
    out, probe = probed_run
    # initial eval, then per round: θ_t, then each older θ_j as a reference
    m0, m1 = out / "iter_000" / "model", out / "iter_001" / "model"
    assert [p for p, _ in probe.loads] == [None, None, m0, None, m1, m0, None]
    assert max(alive for _, alive in probe.loads) <= 2
    assert probe.alive_in_training == [1, 1, 1]


def test_team_log_probs_come_from_the_right_checkpoints(probed_run, tiny_ground):
    """Round 2's stored L_θj equal a direct forward of θ_0, θ_1, θ_2 on the same rows."""
    from sparring.config import ModelConfig
    from sparring.data import encode, parse_row
    from sparring.logprobs import collate, sequence_logps
    from sparring.modeling import load_model, load_tokenizer

    out, _ = probed_run
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    row = rows(out / "iter_001" / "generated.jsonl")[3]  # a row of D_1, scored in round 2 by every player
    example = parse_row({"messages": [*row["prompt"], {"role": "assistant", "content": row["real"]}]})
    prompt_ids, real_ids = encode(tok, example.prompt, example.real, max_length=96)
    # y′ as sampled (its token ids, cut to the context as training cuts it): its text need not re-encode to them
    seqs = collate([(prompt_ids, real_ids), (prompt_ids, row["token_ids"][: 96 - len(prompt_ids)])], tok.pad_token_id)
    found = []
    for j, path in enumerate([tiny_ground["model"], out / "iter_000" / "model", out / "iter_001" / "model"]):
        stored = json.loads((out / "iter_002" / f"team_theta{j}.json").read_text())
        with torch.no_grad():
            real, generated = sequence_logps(load_model(ModelConfig(), path), seqs).tolist()
        assert stored["real"][3] == pytest.approx(real, abs=1e-4)
        assert stored["generated"]["1"][3] == pytest.approx(generated, abs=1e-4)
        found.append(real)
    assert len({round(v, 3) for v in found}) == 3  # the three checkpoints are distinguishable


def test_sigkill_in_team_precompute_and_in_training_then_resume_gives_same_weights(
    probed_run, tiny_ground, tmp_path
):
    reference, _ = probed_run
    out = tmp_path / "killed"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]
    log = tmp_path / "log.txt"
    kills = 0
    for pattern in ["iter_002/team_theta1.chunks/chunk-*", "iter_002/checkpoints/step-*"]:
        kills += kill_when(spawn(args, log), pattern, out)
        assert "iter2" not in json.loads((out / "state.json").read_text())["stages"], log.read_text()[-2000:]
    assert kills == 2, log.read_text()[-2000:]
    final = spawn(args, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    for t in range(3):
        assert_same_weights(out / f"iter_{t:03d}" / "model", reference / f"iter_{t:03d}" / "model")
    steps = [(r["iteration"], r["step"]) for r in rows(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(steps) == len(set(steps))


def test_own_player_only_and_mean_log_probs(tiny_ground, tmp_path):
    """every_player_scores_every_row=false: D_k only by θ_k (β = 1 on it); mean: per-token log-probs."""
    from sparring.config import ModelConfig
    from sparring.data import encode, parse_row
    from sparring.logprobs import collate, sequence_logps
    from sparring.modeling import load_model, load_tokenizer

    out = tmp_path / "run"
    extra = ["data.num_prompts=12", "tpaw.iterations=2", "tpaw.every_player_scores_every_row=false",
             "tpaw.logprob_reduction=mean", "eval.num_examples=4"]
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, *extra]) == 0
    theta0 = json.loads((out / "iter_001" / "team_theta0.json").read_text())
    theta1 = json.loads((out / "iter_001" / "team_theta1.json").read_text())
    assert list(theta0["generated"]) == ["0"] and list(theta1["generated"]) == ["1"]
    # mean: the stored reference log-probs are per-token means, as the policy's are in training
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    row = rows(out / "iter_000" / "generated.jsonl")[0]
    example = parse_row({"messages": [*row["prompt"], {"role": "assistant", "content": row["real"]}]})
    seqs = collate([encode(tok, example.prompt, example.real, max_length=96)], tok.pad_token_id)
    with torch.no_grad():
        theta0 = load_model(ModelConfig(name_or_path=tiny_ground["model"]))
        mean, total = sequence_logps(theta0, seqs, average=True).item(), sequence_logps(theta0, seqs).item()
    stored = json.loads((out / "iter_000" / "team_theta0.json").read_text())["real"][0]
    assert stored == pytest.approx(mean, abs=1e-5) and abs(total - mean) > 1e-2
    train_rows = [r for r in rows(out / "metrics.jsonl") if r["kind"] == "train" and r["iteration"] == 1]
    for r in train_rows:
        assert math.isfinite(r["loss"])
        for j in (0, 1):  # a row has one player, so its weight is 1; NaN = no row of that set in the step
            assert math.isnan(r[f"tpaw/player{j}/weight"]) or r[f"tpaw/player{j}/weight"] == pytest.approx(1.0)
        assert r["tpaw/weight_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert any(math.isfinite(r["tpaw/player1/margin"]) for r in train_rows)


def test_training_loop_leaves_nan_metrics_out_of_the_step_mean(tmp_path):
    """A player that scores no row of a micro-batch reports NaN; the loop averages the others."""
    from accelerate import Accelerator

    from sparring.config import TrainConfig
    from sparring.losses import LossOutput
    from sparring.training import MetricsLogger, train

    def step(model, batch):  # record value v: metric "m" = v (NaN for the NaN records), loss finite
        loss = model(torch.ones(len(batch), 1)).squeeze(-1) ** 2
        return LossOutput(loss, {"m": batch.mean(), "never": torch.tensor(math.nan)})

    logger = MetricsLogger(tmp_path / "metrics.jsonl", None)
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, epochs=1, batch_size=1, grad_accum=4, save_steps=100)
    train(torch.nn.Linear(1, 1), [math.nan, 2.0, 4.0, math.nan], collate=torch.tensor, loss_step=step, cfg=cfg,
          accelerator=Accelerator(cpu=True), folder=tmp_path, logger=logger, log_fields={"iteration": 0})
    (row,) = logger.rows()
    assert row["m"] == pytest.approx(3.0) and math.isnan(row["never"]) and math.isfinite(row["loss"])
