"""Row formats, bad rows, sources, and the one chat rendering (prefix property)."""

from __future__ import annotations

import json

import pytest

from sparring.config import DataConfig
from sparring.data import DataError, encode, load_examples, load_rows, parse_row, render_prompt
from sparring.data.dataset import load_training_set
from sparring.tasks import build_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
USER1 = {"role": "user", "content": "What is 2 + 2?"}
ASSIST1 = {"role": "assistant", "content": "4"}
USER2 = {"role": "user", "content": "And 3 + 3?"}
ASSIST2 = {"role": "assistant", "content": "6"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_messages_format_keeps_system_and_earlier_turns():
    ex = parse_row({"messages": [SYSTEM, USER1, ASSIST1, USER2, ASSIST2]})
    assert ex.prompt == [SYSTEM, USER1, ASSIST1, USER2]
    assert ex.real == "6" and ex.generated is None


def test_prompt_completion_strings_and_message_lists():
    assert parse_row({"prompt": "hi", "completion": "hello"}).prompt == [{"role": "user", "content": "hi"}]
    ex = parse_row({"prompt": [SYSTEM, USER1], "completion": [ASSIST1]})
    assert ex.prompt == [SYSTEM, USER1] and ex.real == "4"


def test_spin_released_format():
    row = {"real": [USER1, ASSIST1], "generated": [USER1, {"role": "assistant", "content": "5"}]}
    ex = parse_row(row)
    assert (ex.prompt, ex.real, ex.generated) == ([USER1], "4", "5")


def test_system_prompt_is_added_only_when_missing():
    assert parse_row({"messages": [USER1, ASSIST1]}, system_prompt="S").prompt[0] == {"role": "system", "content": "S"}
    assert parse_row({"messages": [SYSTEM, USER1, ASSIST1]}, system_prompt="S").prompt[0] == SYSTEM


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "x"}, "cannot tell the row format"),
        ({"messages": [USER1]}, "must end with an assistant message"),
        ({"messages": [USER1, {"role": "assistant", "content": "  "}]}, "real response is empty"),
        ({"messages": [USER1, {"role": "assistant", "content": 4}]}, "string 'role' and 'content'"),
        ({"messages": "hello"}, "non-empty list of messages"),
        ({"messages": [{"role": "robot", "content": "x"}, ASSIST1]}, "has role 'robot'"),
        ({"prompt": "hi", "completion": ""}, "real response is empty"),
        ({"real": [USER1, ASSIST1], "generated": [USER2, ASSIST2]}, "different prompts"),
    ],
)
def test_bad_rows_raise_clear_errors(row, message):
    with pytest.raises(DataError, match=message):
        parse_row(row)


def test_bad_row_is_named_by_number_or_skipped_and_counted():
    rows = [{"messages": [USER1, ASSIST1]}, {"messages": [USER1]}, {"prompt": 3, "completion": "x"}]
    with pytest.raises(DataError, match=r"data.jsonl: row 1: 'messages' must end with an assistant message"):
        load_examples(rows, source="data.jsonl")
    examples, report = load_examples(rows, source="data.jsonl", on_bad_row="skip")
    assert len(examples) == 1 and examples[0].row == 0
    assert report.rows == 3 and report.kept == 1 and sum(report.skipped.values()) == 2


def test_prompt_longer_than_limit_is_a_bad_row(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    long_user = {"role": "user", "content": "x" * 100}
    path.write_text("\n".join(json.dumps(r) for r in [{"messages": [USER1, ASSIST1]}, {"messages": [long_user, ASSIST1]}]))
    cfg = DataConfig(source=str(path), max_prompt_length=50, max_length=80)
    with pytest.raises(DataError, match=r"row 1: prompt has 1\d\d tokens, more than data.max_prompt_length=50"):
        load_training_set(cfg, tokenizer)
    cfg.on_bad_row = "skip"
    data = load_training_set(cfg, tokenizer)
    assert len(data.examples) == 1 and data.report.skipped


def test_sources_jsonl_json_parquet_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [USER1, ASSIST1]}, {"messages": [USER2, ASSIST2]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "d"))
    for source in ["a.jsonl", "a.json", "a.parquet", "dd", "d"]:
        loaded = load_rows(str(tmp_path / source), split="train")
        assert [parse_row(r).real for r in loaded] == ["4", "6"], source
    with pytest.raises(DataError, match="no split 'test'"):
        load_rows(str(tmp_path / "dd"), split="test")
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))


def test_hub_dataset_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load dataset 'sparring-tests/no-such-dataset'"):
        load_rows("sparring-tests/no-such-dataset")


def test_rendered_prompt_tokens_are_a_prefix_of_prompt_plus_response(tokenizer):
    prompt = [SYSTEM, USER1, ASSIST1, USER2]
    prompt_ids, response_ids = encode(tokenizer, prompt, "6")
    full_text = tokenizer.apply_chat_template([*prompt, ASSIST2], tokenize=False)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert prompt_ids + response_ids == full_ids
    assert render_prompt(tokenizer, prompt).endswith("<|assistant|>")
    assert tokenizer.decode(response_ids) == "6<|end|>"  # the response carries the end of turn
    assert response_ids[-1] == tokenizer.eos_token_id


def test_response_is_cut_to_max_length(tokenizer):
    prompt_ids, response_ids = encode(tokenizer, [USER1], "123456789", max_length=20)
    assert len(prompt_ids) + len(response_ids) == 20


def test_tokenizer_without_chat_template_uses_plain_turns():
    plain = build_tokenizer()
    plain.chat_template = None
    # No trailing space after "Assistant:" (a BPE boundary trap); the turn is closed by EOS, and the
    # template's "\n\n" after it is glue between turns that no generator samples.
    assert render_prompt(plain, [USER1]) == "User: What is 2 + 2?\n\nAssistant:"
    prompt_ids, response_ids = encode(plain, [USER1], "4")
    assert plain.decode(response_ids) == " 4<|end|>"
    assert plain.decode(prompt_ids + response_ids) == "User: What is 2 + 2?\n\nAssistant: 4<|end|>"
