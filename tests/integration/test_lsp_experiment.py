"""The LSP edge-of-competence experiment at toy size: every stage runs, writes its report section and
plot, and a rerun recomputes nothing."""

from __future__ import annotations

import json

import pytest
from tests.conftest import REPO

from sparring.experiments import lsp_ground

pytestmark = pytest.mark.slow


def test_lsp_experiment_toy_size_runs_every_stage_and_a_rerun_recomputes_nothing(tmp_path):
    out, report, plot = tmp_path / "exp", tmp_path / "RESULTS.md", tmp_path / "results" / "lsp.png"
    report.write_text("# Results\n\nkept\n\n<!-- lsp:start -->\nold\n<!-- lsp:end -->\n\ntail kept\n")
    overrides = [
        f"output_dir={out}", f"report={report}", f"plot={plot}", f"preset={REPO / 'configs/lsp/tiny.yaml'}",
        "family=add", "difficulties=[2, 3]", "challenger_prompt='Ask one new question: add two {difficulty}-digit numbers.'",
        "train_per_difficulty=24", "validation_per_difficulty=4", "test_per_difficulty=4", "hidden_size=32",
        "sft_max_steps=10", "sft_eval_every=5", "sft_eval_k=2", "target_pass1=0.0", "min_validity=0.0",
        "validity_samples=2", "judge_probe=1", "lr_grid=[1.0e-4, 3.0e-4]", "seeds=[0, 1]", "steps=2",
        "eval_every=2", "num_queries=2", "answers_per_query=2", "query_max_new_tokens=12", "max_new_tokens=4",
        "sft_arm_batch_size=8", "eval_k=2", "workers=1",
        "overrides=[generation.batch_size=8, train.batch_size=8, eval.batch_size=8]",
    ]
    cfg = lsp_ground.load(REPO / "configs" / "experiments" / "lsp.yaml", overrides)
    assert lsp_ground.run(cfg) == report
    text = report.read_text()
    assert text.startswith("# Results\n\nkept") and text.rstrip().endswith("tail kept") and "\nold\n" not in text
    assert text.count("## LSP at the edge of competence") == 1 and plot.stat().st_size > 1000
    history = json.loads((out / "theta0" / "sft_history.json").read_text())
    assert history["reached"] and set(history["chosen"]["on_difficulty"]) == {"2", "3"}
    probe = json.loads((out / "judge_probe.json").read_text())
    ran = ["grpo_gen", "lsp_zero", "grpo_data", "sft"] + (["lsp"] if probe["parsed_frac"] > 0 else [])
    for arm in ran:
        assert f"| {arm} (lr " in text
        for seed in (0, 1):
            assert len(list((out / "runs" / arm).glob(f"lr*/seed{seed}/test/step2.json"))) == 1
        assert {p.parent.name for p in (out / "runs" / arm).glob("lr*/seed0")} == {"lr0.0001", "lr0.0003"}
    gen = json.loads((out / "runs" / "grpo_data").glob("lr*/seed1/test/step2.json").__next__().read_text())
    assert set(gen) == {"scores", "parseable", "on_difficulty"}
    rows = [json.loads(line) for line in next((out / "runs" / "grpo_gen").glob("lr*/seed1")).joinpath(
        "metrics.jsonl").read_text().splitlines()]
    lsp_rows = [r for r in rows if r.get("kind") == "lsp"]
    assert len(lsp_rows) == 2 and all(len(r["lsp/query_values"]) == 2 and "lsp/signal_frac" in r for r in lsp_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(ran)

    # Rerunning recomputes nothing (no run, model or score file is rewritten) and rewrites the section in place.
    produced = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    produced |= {p: p.stat().st_mtime_ns for p in (out / "test").rglob("*")}
    produced[out / "theta0" / "model.safetensors"] = (out / "theta0" / "model.safetensors").stat().st_mtime_ns
    lsp_ground.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in produced} == produced
    assert report.read_text().count("## LSP at the edge of competence") == 1
