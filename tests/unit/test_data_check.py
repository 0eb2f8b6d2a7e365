"""``sparring data check FILE CONFIG``: formats, bad rows by kind with row numbers, token lengths, limits."""

from __future__ import annotations

import json

import pytest

from sparring.cli import main
from sparring.tasks.tiny import build_tokenizer


@pytest.fixture
def config(tmp_path):
    build_tokenizer().save_pretrained(tmp_path / "model")  # the character tokenizer: one token a character
    path = tmp_path / "run.yaml"
    path.write_text(f"method: spin\nmodel:\n  name_or_path: {tmp_path / 'model'}\n"
                    "data:\n  max_prompt_length: 40\n  max_length: 60\n")
    return path


def write(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_a_clean_file_reports_formats_lengths_and_cut_responses_and_exits_0(tmp_path, config, capsys):
    rows = [chat("12+34=", "46")] * 3 + [{"prompt": "9+9=", "completion": "18"}]
    rows.append({"real": chat("1+1=", "2" * 80)["messages"], "generated": chat("1+1=", "3")["messages"]})
    assert main(["data", "check", write(tmp_path, rows), str(config)]) == 0
    out = capsys.readouterr().out
    assert "5 rows, 5 usable, 0 bad" in out
    assert "formats: messages 3, prompt_completion 1, spin 1" in out
    assert "rows with a generated response y′ (SPIN format): 1" in out
    assert "prompt tokens: median" in out and "response tokens: median" in out
    assert "responses cut to fit data.max_length=60: 1" in out  # the 80-character answer


def test_bad_rows_are_grouped_by_kind_with_their_row_numbers_and_fail_the_check(tmp_path, config, capsys):
    rows = [chat("12+34=", "46"), {"text": "no format"}, chat("x" * 50, "1"), chat("y" * 70, "2"),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}]
    assert main(["data", "check", write(tmp_path, rows), str(config)]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "5 rows, 1 usable, 4 bad" in out and "formats: messages 4, unknown 1" in out
    assert "bad: 2 × prompt has N tokens, more than data.max_prompt_length=N (rows 2, 3)" in out
    assert "(rows 1)" in out and "(rows 4)" in out
    assert "prompts over data.max_prompt_length=40: 2 (bad rows)" in out
    assert "data.on_bad_row=error" in captured.err
    # With on_bad_row=skip the run would go on without them: reported, exit 0.
    assert main(["data", "check", write(tmp_path, rows), str(config), "data.on_bad_row=skip"]) == 0


def test_a_missing_file_is_a_clear_error(tmp_path, config, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl"), str(config)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
