"""SPIN end to end on a tiny model: two iterations, files, reference = previous iterate, kill and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights, kill_when, spawn

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["data.num_prompts=32", "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=16"]


@pytest.fixture(scope="module")
def finished_run(tiny_ground, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spin") / "run"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    return out


def test_two_iterations_write_every_artifact(finished_run: Path):
    state = json.loads((finished_run / "state.json").read_text())
    for stage in ["iter0/generated", "iter0", "iter1/generated", "iter1"]:
        assert stage in state["stages"], stage
    for t in (0, 1):
        model_dir = finished_run / f"iter_{t:03d}" / "model"
        assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
        assert not (finished_run / f"iter_{t:03d}" / "checkpoints").exists()  # cleaned once done
    assert (finished_run / "config.yaml").exists() and (finished_run / "plot.png").stat().st_size > 1000
    assert list((finished_run / "tb").glob("events.out.tfevents.*"))
    assert "held-out exact match" in (finished_run / "results.md").read_text()
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
            "logps/real", "logps/generated"} <= set(train_rows[0])
    assert [r["label"] for r in rows if r["kind"] == "eval"] == ["initial", "iter0", "iter1"]
    # First step of each iteration: policy = opponent, so loss = log 2 (spec SPIN fact 1).
    for t in (0, 1):
        first = next(r for r in train_rows if r["iteration"] == t)
        assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    # Iteration 1 mixes iteration 0's synthetic pairs with its own (spin.mix_previous = 1).
    assert state["stages"]["iter1"]["pairs"] == 2 * state["stages"]["iter0"]["pairs"] == 64


def test_opponent_of_iteration_1_is_the_previous_iterate(finished_run: Path, tiny_ground):
    """L_θt in iteration 1's pairs equals log-probs under θ_1 (iteration 0's output), not θ_0."""
    from sparring.config import ModelConfig
    from sparring.data import encode, parse_row
    from sparring.logprobs import collate, sequence_logps
    from sparring.modeling import load_model, load_tokenizer

    pairs = [json.loads(line) for line in (finished_run / "iter_001" / "pairs.jsonl").read_text().splitlines()]
    generated = [json.loads(line) for line in (finished_run / "iter_001" / "generated.jsonl").read_text().splitlines()]
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    theta1 = load_model(ModelConfig(), finished_run / "iter_000" / "model")
    theta0 = load_model(ModelConfig(name_or_path=tiny_ground["model"]))
    example = parse_row({"messages": [*generated[0]["prompt"], {"role": "assistant", "content": generated[0]["real"]}]})
    seqs = collate([encode(tok, example.prompt, example.real, max_length=96),
                    encode(tok, example.prompt, pairs[0]["generated"], max_length=96)], tok.pad_token_id)
    with torch.no_grad():
        under1, under0 = sequence_logps(theta1, seqs), sequence_logps(theta0, seqs)
    assert pairs[0]["opponent_real"] == pytest.approx(under1[0].item(), abs=1e-4)
    assert pairs[0]["opponent_generated"] == pytest.approx(under1[1].item(), abs=1e-4)
    assert abs(under1[0].item() - under0[0].item()) > 1e-3  # the check can tell θ_1 from θ_0


def test_rerun_of_a_finished_run_does_nothing_new(finished_run: Path, tiny_ground, capsys):
    before = (finished_run / "iter_001" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, finished_run), *SMALL]) == 0
    assert (finished_run / "iter_001" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert "resuming spin run" in capsys.readouterr().out


def test_changed_setting_is_refused_on_resume_unless_forced(finished_run: Path, tiny_ground, capsys):
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, finished_run), *SMALL, "train.lr=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0001 -> 0.5" in err and "--force" in err
    assert main([*args, "--force"]) == 0


def test_bad_row_stops_the_run_with_its_number_or_is_skipped(tiny_ground, tmp_path, capsys):
    lines = Path(tiny_ground["train"]).read_text().splitlines()[:20]
    lines.insert(7, json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, tmp_path / "run"), f"data.source={data}",
            "data.num_prompts=8", "spin.iterations=1", "eval.num_examples=4"]
    assert main(args) == 2
    assert "row 7: 'messages' must end with an assistant message" in capsys.readouterr().err
    assert main([*args, "data.on_bad_row=skip", "--force"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out


def test_released_spin_format_reuses_its_generated_responses_at_iteration_0(tiny_ground, tmp_path):
    rows = [json.loads(line) for line in Path(tiny_ground["train"]).read_text().splitlines()[:8]]
    spin_rows = [{"real": r["messages"], "generated": [*r["messages"][:-1], {"role": "assistant", "content": "0"}]}
                 for r in rows]
    data = tmp_path / "spin.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in spin_rows))
    out = tmp_path / "run"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), f"data.source={data}", "spin.iterations=1",
            "eval.num_examples=4"]
    assert main(args) == 0
    assert not (out / "iter_000" / "generated.jsonl").exists()  # nothing sampled at iteration 0
    pairs = [json.loads(line) for line in (out / "iter_000" / "pairs.jsonl").read_text().splitlines()]
    assert {p["generated"] for p in pairs} == {"0"}


def test_sigkill_mid_epoch_during_generation_and_during_logprobs_then_resume_gives_same_weights(
    finished_run: Path, tiny_ground, tmp_path
):
    out = tmp_path / "killed"
    # save_steps only decides when checkpoints are written, so this run must match the fixture's.
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "train.save_steps=2"]
    log = tmp_path / "log.txt"
    kills = 0
    for pattern in ["iter_000/checkpoints/step-*", "iter_001/generated.chunks/chunk-*",
                    "iter_001/opponent_logps.chunks/chunk-*", "iter_001/checkpoints/step-*"]:
        if kill_when(spawn(args, log), pattern, out):
            kills += 1
            assert "iter1" not in json.loads((out / "state.json").read_text())["stages"]
    assert kills >= 3, log.read_text()[-2000:]  # the kills landed inside the stages
    final = spawn(args, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert log.read_text().count("resuming spin run") >= 4
    assert_same_weights(out / "iter_001" / "model", finished_run / "iter_001" / "model")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["iteration"], r["step"]) for r in rows if r["kind"] == "train"]
    assert len(steps) == len(set(steps))  # resumed training never logs a step twice


def test_status_and_report_commands(finished_run: Path, capsys):
    assert main(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "method: spin" in out and "done  iter1 " in out and "done  iter0/generated" in out
    (finished_run / "plot.png").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert "| θ2 (after iteration 1) |" in capsys.readouterr().out
    assert (finished_run / "plot.png").exists()


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_y_prime_trains_on_the_sampled_ids_and_a_truncated_one_gets_no_end_of_turn(tiny_ground, tmp_path, policy,
                                                                                   monkeypatch):
    import sparring.stages as stages
    from sparring.training import train

    seen = []  # the records SPIN trains on
    monkeypatch.setattr(stages, "train", lambda model, records, **kw: seen.append(records) or train(model, records, **kw))
    out = tmp_path / "run"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), "data.num_prompts=24", "spin.iterations=1",
            "eval.num_examples=4", "generation.max_new_tokens=6", f"generation.on_truncated={policy}"]
    assert main(args) == 0
    samples = [json.loads(line) for line in (out / "iter_000" / "generated.jsonl").read_text().splitlines()]
    truncated = [not r["finished"] for r in samples]
    assert 0 < sum(truncated) < len(samples)  # the setting gives both kinds
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["iter0/generated"]["truncated"] == sum(truncated)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["truncated"] for r in logged if r["kind"] == "generation"] == [sum(truncated)]
    eos = 3  # <|end|>, the proving ground's end of turn
    by_ids = {tuple(r.generated_ids) for r in seen[0]}
    for r in samples:
        ids = tuple(r["token_ids"])
        assert (ids[-1] == eos) == r["finished"] and eos not in ids[:-1]  # no end of turn it did not sample
        assert (ids in by_ids) == (r["finished"] or policy == "keep")
    assert len(seen[0]) == (len(samples) if policy == "keep" else len(samples) - sum(truncated))
    same = sum(r.generated_ids == r.real_ids for r in seen[0])  # zero-gradient pairs, counted
    assert state["stages"]["iter0"]["pairs_generated_equals_real"] == same


def test_nll_term_is_logged_and_added_to_the_loss(tiny_ground, tmp_path):
    out = tmp_path / "run"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "spin.iterations=1", "spin.nll_coef=1.0"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows and all(r["nll/real"] > 0 for r in train_rows)
    # First step: policy = opponent, so the pair term is log 2 and the loss is log 2 + 1.0 · NLL(y).
    assert train_rows[0]["loss"] == pytest.approx(0.693147 + train_rows[0]["nll/real"], abs=1e-4)


def test_a_run_with_the_prompt_shared_trains_the_same_weights(tiny_ground, tmp_path):
    """train.share_prompt changes how the batch is laid out, not what is computed: the same y′, the same
    θ1 (float noise only) and the same logged losses, with fewer token positions through the model."""
    runs = {}
    for share in (False, True):
        out = tmp_path / str(share)
        args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, "spin.iterations=1",
                f"train.share_prompt={str(share).lower()}", "eval.num_examples=4"]
        assert main(args) == 0
        runs[share] = out
    assert (runs[True] / "iter_000" / "generated.jsonl").read_text() == (runs[False] / "iter_000" / "generated.jsonl").read_text()
    assert_same_weights(runs[True] / "iter_000" / "model", runs[False] / "iter_000" / "model", atol=1e-5)
    losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
              for run in (runs[False], runs[True])]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
