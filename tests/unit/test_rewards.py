"""Rewards: the RewardFn interface, HF reward models (tiny model built here), user functions, self-judge."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparring.rewards import (
    SELF_REWARD_PROMPT,
    HFRewardModel,
    QualityScore,
    RewardBatch,
    RewardFn,
    SelfJudge,
    UserReward,
    load_user_reward,
    parse_quality_score,
    score_one,
)

SRC = Path(__file__).resolve().parents[2] / "src"


# ---------------------------------------------------------------- base


def test_reward_batch_checks_lengths():
    batch = RewardBatch([1.0, 0.0], [True, False])
    assert len(batch) == 2 and batch.num_invalid == 1
    with pytest.raises(ValueError, match="2 scores but 1 validity"):
        RewardBatch([1.0, 0.0], [True])


def test_implementations_satisfy_protocol():
    judge = SelfJudge(lambda prompts: ["<Score>1</Score>"] * len(prompts))
    assert isinstance(judge, RewardFn)
    assert isinstance(UserReward(lambda q, a: 1.0), RewardFn)
    assert not isinstance(object(), RewardFn)


def test_import_hygiene():
    code = (
        "import sys, sparring.rewards, sparring.losses.lsp\n"
        "bad = [m for m in ('transformers', 'trl', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- user functions

USER_MODULE = """
import math

def length(query, answer):
    return float(len(answer))

def exact(query, answer):
    return answer.strip() == query.strip()  # bool: a pass/fail verifier

def maybe(query, answer):
    if not query.isdigit():
        return None  # cannot judge
    return 1.0 if answer == str(int(query) * 2) else 0.0

def nan(query, answer):
    return math.nan if answer == "bad" else 1.0

def text(query, answer):
    return "1.0"

class Scorer:
    @staticmethod
    def score(query, answer):
        return 2.5

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "sparring_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    (tmp_path / "sparring_test_broken.py").write_text("import sparring_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, "sparring_test_broken"):
        sys.modules.pop(mod, None)


def test_load_user_reward_scores(user_module):
    fn = load_user_reward(f"{user_module}:length")
    batch = fn(["q1", "q2"], ["abc", ""])
    assert batch.scores == [3.0, 0.0] and batch.valid == [True, True]
    assert fn.score("q", "four") == 4.0
    assert load_user_reward(f"{user_module}:Scorer.score")(["q"], ["a"]).scores == [2.5]
    assert load_user_reward(f"{user_module}:exact")(["x", "x"], ["x", "y"]).scores == [1.0, 0.0]


def test_user_reward_none_means_invalid(user_module):
    fn = load_user_reward(f"{user_module}:maybe")
    batch = fn(["3", "3", "three"], ["6", "7", "6"])
    assert batch.scores == [1.0, 0.0, 0.0]
    assert batch.valid == [True, True, False]
    with pytest.raises(ValueError, match="could not judge"):
        fn.score("three", "6")


def test_user_reward_non_finite_names_the_pair(user_module):
    fn = load_user_reward(f"{user_module}:nan")
    with pytest.raises(ValueError, match=r"non-finite nan.*query='q2', answer='bad'"):
        fn(["q1", "q2"], ["good", "bad"])


def test_user_reward_non_number_raises(user_module):
    with pytest.raises(TypeError, match=r"returned str '1.0'.*query='q'"):
        load_user_reward(f"{user_module}:text")(["q"], ["a"])


def test_user_reward_accepts_numpy_and_torch_scalars():
    np = pytest.importorskip("numpy")
    assert UserReward(lambda q, a: np.float32(0.5))(["q"], ["a"]).scores == [0.5]
    assert UserReward(lambda q, a: torch.tensor(0.25))(["q"], ["a"]).scores == [0.25]
    with pytest.raises(TypeError):
        UserReward(lambda q, a: torch.tensor([0.25, 1.0]))(["q"], ["a"])


@pytest.mark.parametrize(
    "spec", ["no_colon", "a:b:c", ":func", "module:", "module:not-an-identifier", "mod:a..b", 42]
)
def test_bad_spec_strings(spec):
    with pytest.raises(ValueError, match=r"package\.module:function"):
        load_user_reward(spec)


def test_missing_module_attribute_and_non_callable(user_module):
    with pytest.raises(ImportError, match="module 'sparring_no_such_module_abc' not found"):
        load_user_reward("sparring_no_such_module_abc:f")
    with pytest.raises(ImportError, match=r"module 'sparring_no_such_pkg_abc\.sub' not found"):
        load_user_reward("sparring_no_such_pkg_abc.sub:f")
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        load_user_reward(f"{user_module}:missing")
    with pytest.raises(TypeError, match="'NOT_CALLABLE' is a int, not callable"):
        load_user_reward(f"{user_module}:NOT_CALLABLE")


def test_missing_dependency_inside_module_is_not_misreported(user_module):
    with pytest.raises(ModuleNotFoundError, match="sparring_no_such_dependency_xyz") as info:
        load_user_reward("sparring_test_broken:f")
    assert "is it installed" not in str(info.value)


def test_pair_validation():
    fn = UserReward(lambda q, a: 1.0)
    with pytest.raises(ValueError, match="2 queries but 1 answers"):
        fn(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="answers\\[1\\] must be str"):
        fn(["a", "b"], ["c", None])
    with pytest.raises(TypeError, match="lists of strings"):
        fn("ab", "cd")
    assert fn([], []).scores == []


# ---------------------------------------------------------------- self-judge parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Good answer.\n<Calculation>1+1+1+1+0+1+1=6</Calculation>\n<Score>6</Score>", (6, "score")),
        ("<Score>0</Score>", (0, "score")),
        ("<Score>7</Score>", (7, "score")),
        ("<Score> 4 </Score>", (4, "score")),
        ("<Score>\n3\n</Score>", (3, "score")),
        ("<score>5</score>", (5, "score")),
        ("<Score>5.0</Score>", (5, "score")),
        ("<Score>2</Score> on reflection <Score>6</Score>", (6, "score")),  # the last one wins
        ("<Calculation>1+1+1+1+1+1+1=7</Calculation><Score>3</Score>", (3, "score")),  # Score beats calc
        # out-of-range or malformed Score → Calculation
        ("<Calculation>1+1+1+1+1+1+1=7</Calculation><Score>8</Score>", (7, "calculation")),
        ("<Calculation>1+0+1</Calculation><Score>-1</Score>", (2, "calculation")),
        ("<Calculation>1 + 0 + 1 = 2</Calculation><Score>5/7</Score>", (2, "calculation")),
        ("<Calculation>1+1+1=2</Calculation>", (3, "calculation")),  # stated total ignored, terms re-added
        ("<Calculation>\n1+0+0+0+0+0+1\n=2</Calculation><Score>two</Score>", (2, "calculation")),
        ("<Calculation>0</Calculation>", (0, "calculation")),
        ("<Score>4</Score> <Score>9</Score> <Calculation>1+1+1+1</Calculation>", (4, "calculation")),
        # nothing usable → 0 / fallback
        ("", (0, "fallback")),
        ("The score is 5.", (0, "fallback")),
        ("<Score>5", (0, "fallback")),  # unclosed
        ("<Score>9</Score>", (0, "fallback")),
        ("<Score>4</Score> <Score>9</Score>", (0, "fallback")),  # only the last Score counts
        ("<Score>five</Score>", (0, "fallback")),
        ("<Score></Score><Calculation></Calculation>", (0, "fallback")),
        ("<Calculation>1+1+1+1+1+1+1+1=8</Calculation>", (0, "fallback")),  # 8 terms
        ("<Calculation>1+2+1=4</Calculation>", (0, "fallback")),  # a term that is not 0/1
        ("<Calculation>1+0+x=1</Calculation>", (0, "fallback")),
        ("<Calculation>=5</Calculation>", (0, "fallback")),
    ],
)
def test_parse_quality_score(text, expected):
    assert parse_quality_score(text) == QualityScore(*expected)


def test_prompt_has_slots_and_does_not_parse_as_a_score():
    filled = SELF_REWARD_PROMPT.format(instruction="Write a {poem}.", response="Roses are red.")
    assert "<Instruction>\nWrite a {poem}.\n</Instruction>" in filled
    assert "<Response>\nRoses are red.\n</Response>" in filled
    assert "<Calculation>" in filled and "<Score>" in filled
    assert parse_quality_score(filled) == QualityScore(0, "fallback")  # an echoed prompt is no score
    for n in range(1, 8):
        assert f"\n{n}. " in filled  # seven criteria


# ---------------------------------------------------------------- self-judge


def test_self_judge_with_fake_generator():
    replies = iter(
        [
            [
                "Fine. <Calculation>1+1+1+1+1+0+0=5</Calculation><Score>5</Score>",
                "<Calculation>1+0</Calculation>",
                "?",
            ]
        ]
    )
    seen: list[list[str]] = []

    def generate(prompts):
        seen.append(prompts)
        return next(replies)

    judge = SelfJudge(generate)
    batch = judge(["q1", "q2", "q3"], ["a1", "a2", "a3"])
    assert batch.scores == [5.0, 1.0, 0.0]
    assert batch.sources == ["score", "calculation", "fallback"]
    assert batch.valid == [True, True, False]
    assert batch.num_fallbacks == 1 and batch.num_invalid == 1
    assert batch.completions[2] == "?"
    assert seen == [[SELF_REWARD_PROMPT.format(instruction=f"q{i}", response=f"a{i}") for i in (1, 2, 3)]]


def test_self_judge_single_pair_and_errors():
    judge = SelfJudge(lambda prompts: ["<Score>3</Score>" if "good" in p else "no idea" for p in prompts])
    assert judge.score("q", "good") == 3.0
    with pytest.raises(ValueError, match="could not judge"):
        judge.score("q", "bad")
    assert len(judge([], [])) == 0
    with pytest.raises(ValueError, match="must return 2 strings"):
        SelfJudge(lambda prompts: ["<Score>1</Score>"])(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="slots"):
        SelfJudge(lambda prompts: prompts, prompt="no slots here")


# ---------------------------------------------------------------- HF reward model (tiny, built here)

CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _save_tiny_reward_model(path: Path, *, chat_template: str | None, num_labels: int = 1) -> None:
    """A char-level tokenizer and a 2-layer Llama sequence classifier, saved like a Hub checkpoint."""
    from tokenizers import Tokenizer, models, processors
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))  # no merges: characters
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        num_labels=num_labels,
        initializer_range=0.5,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _direct_scores(path: Path, texts: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]


QUERIES = ["What is 2+2?", "Name a colour.", "Say hi"]
ANSWERS = ["4", "Blue, or perhaps a long list: red, green, yellow.", "hi!"]


@pytest.mark.parametrize("chat_template", [CHAT_TEMPLATE, None])
def test_hf_reward_model_matches_direct_forward(tmp_path, monkeypatch, chat_template):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _save_tiny_reward_model(tmp_path, chat_template=chat_template)
    rm = HFRewardModel(str(tmp_path), dtype=torch.float64, batch_size=2)
    if chat_template is None:
        texts = [q + "\n" + a for q, a in zip(QUERIES, ANSWERS, strict=True)]
    else:  # the template's BOS is stripped; the tokenizer adds exactly one
        texts = [f"<user>{q}\n<assistant>{a}\n" for q, a in zip(QUERIES, ANSWERS, strict=True)]
        ids = rm.tokenizer(rm.render(QUERIES[0], ANSWERS[0]))["input_ids"]
        assert ids[0] == 1 and 1 not in ids[1:]
    assert [rm.render(q, a) for q, a in zip(QUERIES, ANSWERS, strict=True)] == texts
    batch = rm(QUERIES, ANSWERS)  # batches of 2 with right padding
    expected = _direct_scores(tmp_path, texts)  # one unpadded forward per text
    assert batch.valid == [True] * 3
    torch.testing.assert_close(torch.tensor(batch.scores), torch.tensor(expected), rtol=0, atol=1e-10)
    assert len(set(batch.scores)) == 3  # the pairs really are scored differently
    assert math.isclose(rm.score(QUERIES[1], ANSWERS[1]), expected[1], rel_tol=0, abs_tol=1e-10)
    assert rm.num_truncated == 0
    assert score_one(rm, QUERIES[2], ANSWERS[2]) == pytest.approx(expected[2], abs=1e-10)


def test_hf_reward_model_truncates_and_counts(tmp_path):
    _save_tiny_reward_model(tmp_path, chat_template=None)
    rm = HFRewardModel(str(tmp_path), dtype=torch.float64, max_length=8)
    batch = rm(["short", "a much longer query"], ["x", "and a longer answer"])
    assert rm.num_truncated == 1
    text = "a much longer query\nand a longer answer"
    ids = rm.tokenizer(text, return_tensors="pt")["input_ids"][:, :8]
    with torch.no_grad():
        expected = rm.model(input_ids=ids).logits[0, 0].item()
    assert batch.scores[1] == pytest.approx(expected, abs=1e-10)


def test_hf_reward_model_rejects_multi_label(tmp_path):
    _save_tiny_reward_model(tmp_path, chat_template=None, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2; a reward model needs exactly 1"):
        HFRewardModel(str(tmp_path))
