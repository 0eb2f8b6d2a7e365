"""The known-distribution experiment at toy size: every stage runs, writes its report section and plot,
and a rerun recomputes nothing."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.conftest import REPO

from sparring.cli import main

pytestmark = pytest.mark.slow


def test_distribution_experiment_toy_size_writes_tables_plot_and_resumes(tmp_path, capsys):
    out, report, plot = tmp_path / "exp", tmp_path / "RESULTS.md", tmp_path / "results" / "distribution.png"
    report.write_text("# Results\n\nkept\n\n<!-- plateau:start -->\nplateau\n<!-- plateau:end -->\n")
    presets = {m: str(REPO / "configs" / m / "tiny.yaml") for m in ("spin", "tspin")}
    args = ["experiment", str(REPO / "configs" / "experiments" / "distribution.yaml"), f"output_dir={out}",
            f"report={report}", f"plot={plot}", "subset=24", "validation=8", "test=10", "hidden_size=32",
            "sft_max_steps=10", "sft_eval_every=5", "sft_patience=1", "iterations=1", "seeds=[0, 1]",
            "samples=8", "sample_prompts=6", "temperatures=[0.8, 1.0]", "workers=1", "batch_size=8", "epochs=1",
            "arms=[sft, spin, tspin, spin_nll]",
            "lr_grid={sft: [1.0e-4], spin: [1.0e-5, 1.0e-4], tspin: [1.0e-4], spin_nll: [1.0e-4]}",
            "presets={spin: " + presets["spin"] + ", tspin: " + presets["tspin"] + "}"]
    assert main(args) == 0
    text = report.read_text()
    assert text.startswith("# Results\n\nkept") and "plateau\n<!-- plateau:end -->" in text
    assert "## Known-distribution proving ground" in text and plot.stat().st_size > 1000
    for arm in ("sft", "spin", "tspin", "spin_nll"):
        assert f"| {arm} (lr " in text
        for seed in (0, 1):
            assert list((out / "runs" / arm).glob(f"lr*/seed{seed}/test/theta1.json"))
    assert "| T | exact TV |" in text and "| 0.8 |" in text and "frontier gap" in text
    assert {p.parent.name for p in (out / "runs" / "spin").glob("lr*/seed0")} == {"lr1e-05", "lr0.0001"}
    assert len(list((out / "runs" / "spin").glob("lr*/seed1"))) == 1  # only the chosen rate with more seeds
    assert list((out / "runs" / "spin").glob("lr*/seed0/validation/theta1.json"))
    scores = json.loads(next((out / "runs" / "tspin").glob("lr*/seed1/test/theta1.json")).read_text())
    assert scores["n"] == 8 and len(scores["tv"]) == 10 and all(0.0 <= v <= 1.0 for v in scores["tv"])
    assert all(0.0 <= v <= 1.0 for v in scores["validity"][:6]) and all(v != v for v in scores["validity"][6:])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"sft", "spin", "tspin", "spin_nll"} and set(summary["theta0"]) == {"T0.8", "T1"}
    assert summary["final"]["spin"]["frontier"]["verdict"] in ("beyond", "on", "inside")
    # spin_nll: SPIN's preset with spin.nll_coef = 1 (the default spin_nll_coef); nll/real in its curves
    def saved_spin(arm: str) -> dict:
        return yaml.safe_load((out / "runs" / arm / "lr0.0001" / "seed0" / "config.yaml").read_text())["spin"]

    assert saved_spin("spin_nll")["nll_coef"] == 1.0 and saved_spin("spin")["nll_coef"] == 0.0
    assert {k: v for k, v in saved_spin("spin_nll").items() if k != "nll_coef"} == \
        {k: v for k, v in saved_spin("spin").items() if k != "nll_coef"}
    train = [json.loads(line) for line in (out / "runs" / "spin_nll" / "lr0.0001" / "seed0" / "metrics.jsonl").open()]
    assert all(r["nll/real"] > 0 for r in train if r["kind"] == "train")
    assert "| reward acc. | nll/real | y′ = y |" in text and "Arm spin_nll is SPIN's preset" in text
    # A rerun recomputes nothing (no file of any stage is rewritten) and rewrites the section in place.
    produced = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
                and p.name not in ("summary.json", "wall_seconds.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in produced} == produced
    assert report.read_text().count("## Known-distribution proving ground") == 1
