"""One report for every method: the table, the plot and the samples section of hand-made run directories,
written the same way by ``write_report`` and by ``sparring report RUN_DIR`` (method from config.yaml)."""

from __future__ import annotations

import json

from sparring.cli import main
from sparring.config import DataConfig, ModelConfig, RunConfig, dump_yaml
from sparring.evaluation.report import TEXT_CHARS, write_report
from sparring.state import RunDir, atomic_write_json, write_jsonl


def spin_run(tmp_path) -> tuple[RunDir, RunConfig]:
    rd, cfg = RunDir(tmp_path / "spin"), RunConfig(method="spin", model=ModelConfig(name_or_path="m"),
                                                   data=DataConfig(source="train.jsonl"))
    cfg.spin.iterations = 2
    cfg.eval.source, cfg.eval.verifier = "heldout.jsonl", "proving_ground"  # its metric: exact_match
    rd.root.mkdir()
    rd.config_path.write_text(dump_yaml(cfg))
    atomic_write_json(rd.eval_file(rd.INITIAL), {"exact_match": 0.5, "logps_real_per_token": -1.25})
    atomic_write_json(rd.eval_file(rd.stage_iteration(0)), {"exact_match": 0.75, "logps_real_per_token": -1.0})
    write_jsonl(rd.metrics_path, [
        {"kind": "train", "iteration": 0, "epoch": e, "rewards/margins": m, "rewards/accuracies": a}
        for e, m, a in [(0.5, 0.1, 0.5), (1.0, 0.1, 0.5), (1.5, 0.2, 1.0), (2.0, 0.4, 1.0)]
    ])
    prompt = [{"role": "user", "content": "12+34="}]
    write_jsonl(rd.generated(0), [
        {"row": k, "prompt": prompt, "real": "46", "text": f"4{k}", "finished": k != 1, "token_ids": [1]}
        for k in range(5)
    ])
    return rd, cfg


def lsp_run(tmp_path) -> tuple[RunDir, RunConfig]:
    rd, cfg = RunDir(tmp_path / "lsp"), RunConfig(method="lsp", model=ModelConfig(name_or_path="m"))
    cfg.eval.source, cfg.eval.verifier = "heldout.jsonl", "proving_ground"
    rd.root.mkdir()
    rd.config_path.write_text(dump_yaml(cfg))
    for step, em in [(0, 0.25), (2, 0.5)]:
        atomic_write_json(rd.eval_file(rd.lsp_step_label(step)), {"exact_match": em, "logps_real_per_token": -2.0})
    write_jsonl(rd.metrics_path, [{"kind": "lsp", "step": 1, "lsp/reward": 0.2},
                                  {"kind": "lsp", "step": 2, "lsp/reward": 0.4}])
    write_jsonl(rd.samples, [
        {"step": step, "query": f"q{step}-{i} " + "x" * 500, "answers": ["a", "b"], "rewards": [1.0, 0.0]}
        for step in (1, 2) for i in range(4)
    ])
    return rd, cfg


def test_spin_report_table_plot_and_samples(tmp_path, capsys):
    rd, cfg = spin_run(tmp_path)
    rows = write_report(rd, cfg)
    assert [r["model"] for r in rows] == ["θ0 (initial)", "θ1 (after iteration 0)"]
    text = rd.results.read_text()
    assert "| model | held-out exact match | real log-prob/token | train margin (last epoch) | train reward acc. |" in text
    assert "| θ1 (after iteration 0) | 0.750 | -1.0000 | 0.3000 | 1.000 |" in text  # last epoch only
    assert "| θ0 (initial) | 0.500 | -1.2500 | – | – |" in text
    samples = text[text.index("## Samples"):]
    assert "Iteration 0 (y′ sampled by θ0), the first 3 of 5 prompts" in samples
    assert "1. prompt: user: 12+34=" in samples and "real y: 46" in samples
    assert "generated y′: 40\n" in samples and "generated y′: 41 (truncated)" in samples
    assert "generated y′: 43" not in samples
    assert rd.plot.stat().st_size > 1000
    assert "| θ1 (after iteration 0) |" in capsys.readouterr().out


def test_lsp_report_table_plot_and_samples(tmp_path):
    rd, cfg = lsp_run(tmp_path)
    rows = write_report(rd, cfg)
    assert [(r["step"], r["train_reward"]) for r in rows] == [(0, None), (2, 0.30000000000000004)]
    text = rd.results.read_text()
    assert "| step | held-out exact match | real log-prob/token | mean task reward since last eval |" in text
    assert "| 0 | 0.250 | -2.0000 | – |" in text and "| 2 | 0.500 | -2.0000 | 0.300 |" in text
    samples = text[text.index("## Samples"):]
    assert "Step 2, the first 3 of 4 challenger queries" in samples and "q1-" not in samples
    assert "1. query: q2-0 " in samples and "   - reward 1.000: a" in samples and "   - reward 0.000: b" in samples
    assert "q2-3" not in samples
    assert max(len(line) for line in samples.splitlines()) < TEXT_CHARS + 20  # long texts are cut
    assert rd.plot.stat().st_size > 1000


def test_report_command_writes_the_same_report_for_each_method(tmp_path, capsys):
    for make in (spin_run, lsp_run):
        rd, cfg = make(tmp_path)
        write_report(rd, cfg)
        written = rd.results.read_text()
        rd.results.unlink()
        rd.plot.unlink()
        assert main(["report", str(rd.root)]) == 0
        assert rd.results.read_text() == written and rd.plot.exists()
    assert "| 2 | 0.500 |" in capsys.readouterr().out


def test_the_table_shows_a_user_verifiers_held_out_reward_and_none_without_a_verifier(tmp_path):
    for k, (verifier, header) in enumerate([("mypkg.rewards:judge", "| model | held-out reward | real log-prob/token |"),
                                            (None, "| model | real log-prob/token |")]):
        (tmp_path / str(k)).mkdir()
        rd, cfg = spin_run(tmp_path / str(k))
        cfg.eval.verifier = verifier
        for label, reward in [(rd.INITIAL, 0.25), (rd.stage_iteration(0), 0.625)]:
            atomic_write_json(rd.eval_file(label), {"reward": reward, "logps_real_per_token": -1.0}
                              if verifier else {"logps_real_per_token": -1.0})
        write_report(rd, cfg)
        text = rd.results.read_text()
        assert header in text
        assert ("| θ1 (after iteration 0) | 0.625 | -1.0000 |" in text) == bool(verifier)


def test_report_command_reads_a_config_yaml_with_every_section(tmp_path):
    import yaml

    from sparring.config import to_dict

    rd, cfg = spin_run(tmp_path)  # config.yaml as earlier versions wrote it: every method's section
    rd.config_path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert "lsp" in yaml.safe_load(rd.config_path.read_text())
    assert main(["report", str(rd.root)]) == 0
    assert "| θ1 (after iteration 0) | 0.750 |" in rd.results.read_text()


def test_a_run_without_samples_has_no_samples_section(tmp_path):
    rd, cfg = spin_run(tmp_path)
    rd.generated(0).unlink()
    write_report(rd, cfg)
    assert "## Samples" not in rd.results.read_text()
    assert json.loads(rd.eval_file(rd.INITIAL).read_text())["exact_match"] == 0.5
