"""eval.lm_eval end to end: a one-iteration SPIN run scores θ0 and θ1 on a local lm-evaluation-harness task
(the proving ground's sums as multiple choice, offline), the scores land in eval/<label>.json and the
report, the model's train/eval mode and the random state are left as they were, and a rerun of the
finished run does not run lm_eval again. On two processes each scores a share: the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import REPO, tiny_overrides
from tests.integration.test_multiprocess import torchrun

from sparring.cli import main
from sparring.evaluation import lm_eval

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["spin.iterations=1", "data.num_prompts=16", "generation.batch_size=8", "train.logprob_batch_size=8",
         "eval.num_examples=8", "eval.sample_prompts=2"]
SUMS = [(12, 34), (5, 7), (20, 22), (3, 4), (10, 15), (8, 9)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("lm_eval") / "tasks")


def command(ground: dict[str, str], out: Path, tasks: Path) -> list[str]:
    return ["run", CONFIG, *tiny_overrides(ground, out), *SMALL, "eval.lm_eval.tasks=[tiny_arith]",
            f"eval.lm_eval.include_path={tasks}", "eval.lm_eval.apply_chat_template=true"]


def write_task(folder: Path) -> Path:
    """``tiny_arith``: each sum with its answer and two wrong ones (the answer is first, then +1, −1)."""
    folder.mkdir()
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a + b - 1)], "answer": 0}
            for a, b in SUMS]
    data = folder / "tiny_arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "tiny_arith", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "brier_score"}]}  # a score that varies with every log-prob
    (folder / "tiny_arith.yaml").write_text(yaml.safe_dump(task))
    return folder


def test_lm_eval_scores_every_iterate_once(tiny_ground, task_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = lm_eval.run_lm_eval

    def counted(model, tokenizer, cfg, **kwargs):
        calls.append(model.training)
        rng = torch.random.get_rng_state()
        scores = real(model, tokenizer, cfg, **kwargs)
        assert model.training == calls[-1] and torch.equal(torch.random.get_rng_state(), rng)  # as they were
        return scores

    monkeypatch.setattr(lm_eval, "run_lm_eval", counted)
    out = tmp_path / "run"
    assert main(command(tiny_ground, out, task_folder)) == 0
    assert len(calls) == 2  # θ0 and θ1
    for label in ("initial", "iter0"):
        scores = json.loads((out / "eval" / f"{label}.json").read_text())
        assert 0.0 <= scores["lm_eval/tiny_arith/acc"] <= 1.0 and "lm_eval/tiny_arith/brier_score" in scores, scores
        assert "exact_match" in scores  # beside the held-out scores
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("lm_eval/tiny_arith/acc" in r) for r in evals if r["kind"] == "eval"] == [True, True]
    assert "lm-eval tiny_arith acc" in (out / "results.md").read_text()
    assert "lm-eval tiny_arith acc" in (out / "report.html").read_text()

    assert main(command(tiny_ground, out, task_folder)) == 0  # the finished run again: every evaluation is cached
    assert len(calls) == 2


def test_two_processes_score_like_one(tiny_ground, task_folder, tmp_path):
    from sparring.config import load_config
    from sparring.modeling import load_model, load_tokenizer

    out = tmp_path / "run"
    args = command(tiny_ground, out, task_folder)
    proc = torchrun(args, processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes: 2 (multi_cpu" in proc.stdout
    cfg = load_config(CONFIG, args[2:])
    alone = lm_eval.run_lm_eval(load_model(cfg.model), load_tokenizer(cfg.model), cfg.eval.lm_eval)  # θ0
    shared = json.loads((out / "eval" / "initial.json").read_text())
    assert {k: shared[k] for k in alone} == pytest.approx(alone, abs=1e-6)
