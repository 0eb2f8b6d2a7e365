"""The plateau experiment at toy size: every stage runs, resumes, and writes its report section."""

from __future__ import annotations

import json

import pytest
from tests.conftest import REPO

from sparring.cli import main

pytestmark = pytest.mark.slow


def test_plateau_experiment_toy_size_writes_tables_plot_and_resumes(tmp_path, capsys):
    out, report, plot = tmp_path / "exp", tmp_path / "RESULTS.md", tmp_path / "results" / "plateau.png"
    report.write_text("# Results\n\nkept\n")
    args = ["experiment", str(REPO / "configs" / "experiments" / "plateau.yaml"), f"output_dir={out}",
            f"report={report}", f"plot={plot}", "pool=40", "subset=16", "validation=12", "test=12",
            "hidden_size=32", "sft_max_steps=30", "sft_eval_every=10", "sft_patience=2", "iterations=1",
            "seeds=[0, 1]", "eval_k=2", "workers=1", "batch_size=8", "epochs=1", "max_new_tokens=8",
            "arms=[sft, sft_all, spin, tspin, tpaw, spin_nll]",
            "lr_grid={sft: [1.0e-4], sft_all: [1.0e-4], spin: [1.0e-5, 1.0e-4], tspin: [1.0e-4], tpaw: [1.0e-4], "
            "spin_nll: [1.0e-4]}",
            "presets={spin: " + str(REPO / "configs/spin/tiny.yaml") + ", tspin: " + str(REPO / "configs/tspin/tiny.yaml")
            + ", tpaw: " + str(REPO / "configs/tpaw/tiny.yaml") + "}"]
    assert main(args) == 0
    text = report.read_text()
    assert text.startswith("# Results\n\nkept") and "## Limited-data plateau" in text and plot.stat().st_size > 1000
    for arm in ("sft", "sft_all", "spin", "tspin", "tpaw", "spin_nll"):
        assert f"| {arm} (lr " in text
        for seed in (0, 1):
            assert list((out / "runs" / arm).glob(f"lr*/seed{seed}/test/theta1.json"))
    spin_runs = {p.parent.name for p in (out / "runs" / "spin").glob("lr*/seed*")}
    assert {"lr1e-05", "lr0.0001"} <= spin_runs  # the grid ran with the first seed; only the chosen rate with more
    assert len(list((out / "runs" / "spin").glob("lr*/seed1"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sft", "sft_all", "spin", "tspin", "tpaw", "spin_nll"}
    assert "| reward acc. | nll/real | y′ = y | truncated |" in text and "Arm spin_nll is SPIN's preset" in text
    # Rerunning recomputes nothing and rewrites the same section in place (no duplicate).
    assert main(args) == 0
    assert report.read_text().count("## Limited-data plateau") == 1
