"""``sparring export`` on a finished tiny SPIN run: every model answers a 3-prompt AlpacaEval set and a
3-question MT-Bench file (one question of two turns), in the answer files those benchmarks read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides

from sparring.cli import main
from sparring.config import ModelConfig, RunConfig
from sparring.state import RunDir, write_jsonl

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["data.num_prompts=16", "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=4"]
INSTRUCTIONS = ["What is 60 + 95?", "Reverse the word oje.", "Sort the digits 9 3 0."]
QUESTIONS = [{"question_id": 81, "category": "math", "turns": ["What is 12 + 34?", "Reverse the word abc."]},
             {"question_id": 82, "category": "writing", "turns": ["Sort the digits 3 1 2."]},
             {"question_id": 83, "category": "math", "turns": ["What is 1 + 1?"]}]
TOKENS = ["--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def finished_run(tiny_ground, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    return out


def greedy(model_dir, tiny_ground, messages: list[dict]) -> str:
    """The model's greedy answer to ``messages`` alone (8 new tokens), stripped."""
    from sparring.data import encode
    from sparring.generation import HFGenerator, SamplingParams
    from sparring.modeling import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    model = load_model(ModelConfig(name_or_path=tiny_ground["model"]), model_dir)
    return HFGenerator(model, tok).generate([encode(tok, messages)[0]], SamplingParams.greedy(8), seed=0)[0].text.strip()


def test_alpaca_eval_outputs_of_every_model(finished_run: Path, tiny_ground, tmp_path):
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps([{"instruction": i, "dataset": "tiny"} for i in INSTRUCTIONS]))
    assert main(["export", str(finished_run), str(prompts), "--format", "alpaca_eval", *TOKENS]) == 0
    folder = finished_run / "export" / "alpaca_eval"
    assert sorted(p.name for p in folder.iterdir()) == ["run-theta0.json", "run-theta1.json", "run-theta2.json"]
    for path in folder.iterdir():
        rows = json.loads(path.read_text())
        assert [set(r) for r in rows] == [{"instruction", "output", "generator"}] * 3
        assert [r["instruction"] for r in rows] == INSTRUCTIONS and {r["generator"] for r in rows} == {path.stem}
    theta2 = json.loads((folder / "run-theta2.json").read_text())
    assert theta2[1]["output"] == greedy(finished_run / "iter_001" / "model", tiny_ground,
                                         [{"role": "user", "content": INSTRUCTIONS[1]}])


def test_mt_bench_answers_turn_by_turn_of_the_last_model(finished_run: Path, tiny_ground, tmp_path):
    questions = tmp_path / "question.jsonl"
    write_jsonl(questions, QUESTIONS)
    out = tmp_path / "model_answer"
    assert main(["export", str(finished_run), str(questions), "--format", "mt_bench", "--iterations", "last",
                 "--out", str(out), *TOKENS]) == 0
    assert [p.name for p in out.iterdir()] == ["run-theta2.jsonl"]
    lines = [json.loads(line) for line in (out / "run-theta2.jsonl").read_text().splitlines()]
    assert [set(a) for a in lines] == [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 3
    assert [a["question_id"] for a in lines] == [81, 82, 83] and {a["model_id"] for a in lines} == {"run-theta2"}
    assert len({a["answer_id"] for a in lines}) == 3 and all(isinstance(a["tstamp"], float) for a in lines)
    assert [[c["index"] for c in a["choices"]] for a in lines] == [[0]] * 3
    first, second = lines[0]["choices"][0]["turns"]
    assert [len(a["choices"][0]["turns"]) for a in lines] == [2, 1, 1]
    # The second turn is asked with the conversation so far: the first turn and the model's own answer.
    model = finished_run / "iter_001" / "model"
    turn1 = [{"role": "user", "content": QUESTIONS[0]["turns"][0]}]
    assert first == greedy(model, tiny_ground, turn1)
    assert second == greedy(model, tiny_ground, [*turn1, {"role": "assistant", "content": first},
                                                 {"role": "user", "content": QUESTIONS[0]["turns"][1]}])


def test_a_prompt_file_of_another_format_is_refused(finished_run: Path, tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    write_jsonl(questions, QUESTIONS)
    assert main(["export", str(finished_run), str(questions), "--format", "alpaca_eval"]) == 2
    assert "row 0 is no alpaca_eval question" in capsys.readouterr().err


def test_the_models_of_each_method(tmp_path):
    from sparring.export import models_of

    spin, cfg = RunDir(tmp_path / "spin"), RunConfig(method="spin")
    cfg.spin.iterations = 3
    for folder in (spin.model(0), spin.model(1)):  # iteration 2 not trained yet
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    assert models_of(spin, cfg) == [("theta0", None), ("theta1", spin.model(0)), ("theta2", spin.model(1))]
    assert models_of(spin, cfg, "last") == [("theta2", spin.model(1))]
    lsp = RunDir(tmp_path / "lsp")
    for folder in (lsp.step_model(10), lsp.step_model(5), lsp.final_model):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    names = [name for name, _ in models_of(lsp, RunConfig(method="lsp"))]
    assert names == ["theta0", "step5", "step10", "final"]
