"""Every method runs end to end on models with real tokenizer families, on the ids they sampled.

SentencePiece Llama/Zephyr (BOS added by the tokenizer, end of turn = EOS), ChatML (end of turn
<|im_end|> ≠ EOS <|endoftext|>) and Llama-3 (<|eot_id|>), each with a tiny model taught a few turns
so that it ends some of its turns by itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import REPO
from tests.tokenizer_families import CONVERSATIONS, END_OF_TURN, FAMILIES, build_family, teach_turns

from sparring.cli import main
from sparring.config import ModelConfig
from sparring.data import NotAPrefixError, encode
from sparring.modeling import load_tokenizer
from sparring.state import write_jsonl

pytestmark = pytest.mark.slow
COMMON = ["data.num_prompts=8", "data.max_prompt_length=120", "data.max_length=160", "data.on_bad_row=skip",
          "generation.max_new_tokens=24", "generation.batch_size=8", "train.batch_size=4",
          "train.logprob_batch_size=8", "eval.verifier=none"]


def reward(query: str, answer: str) -> float:
    """A user reward for LSP on free text: longer answers score higher, capped at 1."""
    return min(len(answer) / 20, 1.0)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = build_family(request.param, root / "model", hidden_size=32)
    teach_turns(folder, steps=100)
    rows = [{"messages": c} for c in CONVERSATIONS]
    write_jsonl(root / "data.jsonl", rows)  # training data: a row that is not a token prefix is skipped
    tok = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    write_jsonl(root / "eval.jsonl", [r for r in rows if encodes(tok, r["messages"])])
    return request.param, folder, root / "data.jsonl", root / "eval.jsonl"


def encodes(tok, conv) -> bool:
    try:
        encode(tok, conv[:-1], conv[-1]["content"])
    except NotAPrefixError:
        return False
    return True


def run(method: str, family, out: Path, *extra: str) -> None:
    name, model, data, heldout = family
    args = ["run", str(REPO / "configs" / method / "tiny.yaml"), f"output_dir={out}", f"model.name_or_path={model}",
            f"data.source={data}", f"eval.source={heldout}", *COMMON, *extra]
    assert main(args) == 0


def samples(out: Path, name: str = "generated") -> list[dict]:
    return [json.loads(line) for line in (out / "iter_000" / f"{name}.jsonl").read_text().splitlines()]


def test_spin_on_the_family_trains_on_token_exact_pairs(family, tmp_path):
    name, model, _, _ = family
    out = tmp_path / "spin"
    run("spin", family, out, "spin.iterations=1")
    tok = load_tokenizer(ModelConfig(name_or_path=str(model)))
    eot = tok.convert_tokens_to_ids(END_OF_TURN[name])
    rows = samples(out)
    finished = [r for r in rows if r["finished"]]
    assert finished, "the taught model ends some turns by itself"
    assert all(r["token_ids"][-1] in (eot, tok.eos_token_id) for r in finished)
    assert any(r["token_ids"][-1] == eot for r in finished)  # ChatML / Llama-3: not the tokenizer's EOS
    for r in rows:  # the real response of each row is the continuation of its prompt, in context
        p, y = encode(tok, r["prompt"], r["real"])
        assert tok.decode(p + y).endswith(r["real"] + END_OF_TURN[name])
    assert (out / "iter_000" / "model" / "model.safetensors").exists()
    saved = load_tokenizer(ModelConfig(name_or_path=str(out / "iter_000" / "model")))
    assert saved("a b")["input_ids"] == tok("a b")["input_ids"]  # the checkpoint tokenizes as the base


@pytest.mark.parametrize("method,extra", [("tspin", ["tspin.iterations=1"]), ("tpaw", ["tpaw.iterations=2"])])
def test_tspin_and_tpaw_on_the_family(family, tmp_path, method, extra):
    out = tmp_path / method
    run(method, family, out, *extra)
    state = json.loads((out / "state.json").read_text())
    assert "iter0" in state["stages"]
    if method == "tspin":
        proto, generated = samples(out, "proto"), samples(out)
        assert all("token_ids" in r for r in proto + generated)


def test_lsp_on_the_family(family, tmp_path):
    out = tmp_path / "lsp"
    name, model, _, heldout = family
    args = ["run", str(REPO / "configs" / "lsp" / "tiny.yaml"), f"output_dir={out}", f"model.name_or_path={model}",
            f"eval.source={heldout}", "eval.verifier=none", "lsp.steps=2",
            "lsp.num_queries=2", "lsp.answers_per_query=2", "lsp.eval_every=2", "lsp.save_every=2",
            "lsp.sample_every=1", "lsp.query_max_new_tokens=8", "lsp.answer_max_new_tokens=8",
            "lsp.reward.kind=function", "lsp.reward.function=tests.integration.test_families:reward"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "lsp"] == [1, 2]
    steps = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in steps} == {1, 2} and all(len(r["answers"]) == 2 for r in steps)
