"""LSP self-reward R_Q: the frozen reference model grades each (query, answer) pair 0–7.

Kuba et al. 2025 (arXiv 2509.07414, §3 and Box 3) add R_Q to the Solver's and V_Q to the Challenger's
reward, following Self-Rewarding LMs (Yuan et al. 2024). The grading prompt below is our own wording of
the paper's additive rubric (spec lsp.md B.5): base 0, one point per satisfied criterion, seven
criteria; criteria 1–2 judge the instruction (the Challenger's query), 3–7 the response. Its format
examples use placeholders, not numbers, so a reply that echoes the prompt does not parse as a score.

Parsing (the paper does not say what happens on a bad reply; spec B.5 recommends this order):
  1. the integer in the last ``<Score>…</Score>`` if it is in 0..7        → source "score"
  2. else the sum of the 0/1 terms in the last ``<Calculation>…</Calculation>`` (at most seven terms,
     "1+0+1" or "1+0+1=2"; a stated total is ignored, the terms are re-added) → source "calculation"
  3. else 0                                                                 → source "fallback"
Nothing is clamped: an out-of-range score falls through to step 2.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from sparring.rewards.base import RewardBatch, check_pairs, score_one

MAX_QUALITY_SCORE = 7
QUALITY_SOURCES = ("score", "calculation", "fallback")

SELF_REWARD_PROMPT = """\
Please grade the exchange below between a user and an AI assistant. The user's message is between \
<Instruction> and </Instruction>; the assistant's reply is between <Response> and </Response>.

<Instruction>
{instruction}
</Instruction>

<Response>
{response}
</Response>

Score it additively. Start from 0 and add 1 point for each statement below that holds; add 0 if it \
does not:
1. It is obvious from the instruction what task the user wants done.
2. The instruction is clear, specific and sensibly structured.
3. The user will readily understand the response.
4. The response deals with a substantial part of what was asked, even if not with all of it.
5. The response covers the essential points of the question in a useful and thorough way.
6. The response is clearly written, to the point, well organised and helpful.
7. The user is very likely to be pleased with the form and style of the response.

Reply in this format:
- a short justification of at most 100 words;
- the points for statements 1 to 7 in order, each 0 or 1, added up inside the tags \
<Calculation>p1+p2+p3+p4+p5+p6+p7=total</Calculation>; make sure the sum is right;
- the total, a whole number from 0 to 7, inside the tags <Score>total</Score>.
"""

_SCORE_RE = re.compile(r"<score>(.*?)</score>", re.IGNORECASE | re.DOTALL)
_CALC_RE = re.compile(r"<calculation>(.*?)</calculation>", re.IGNORECASE | re.DOTALL)
_INT_RE = re.compile(r"\s*(\d+)(?:\.0*)?\s*")  # "5", " 5 ", "5.0"; not "5/7", "five", "-1"


class QualityScore(NamedTuple):
    score: int  # 0..7
    source: str  # one of QUALITY_SOURCES


def _score_tag(text: str) -> int | None:
    found = _SCORE_RE.findall(text)
    if not found:
        return None
    match = _INT_RE.fullmatch(found[-1])
    if match is None:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= MAX_QUALITY_SCORE else None


def _calculation_tag(text: str) -> int | None:
    found = _CALC_RE.findall(text)
    if not found:
        return None
    terms = found[-1].split("=")[0].split("+")
    if not 1 <= len(terms) <= MAX_QUALITY_SCORE:
        return None
    terms = [term.strip() for term in terms]
    if any(term not in ("0", "1") for term in terms):
        return None
    return sum(int(term) for term in terms)


def parse_quality_score(text: str) -> QualityScore:
    """Parse a grader reply into R_Q ∈ {0..7}; see the module docstring for the order of attempts."""
    score = _score_tag(text)
    if score is not None:
        return QualityScore(score, "score")
    score = _calculation_tag(text)
    if score is not None:
        return QualityScore(score, "calculation")
    return QualityScore(0, "fallback")


@dataclass(frozen=True)
class SelfJudgeBatch(RewardBatch):
    """A RewardBatch plus where each score came from and the raw grader replies.

    ``valid`` is False exactly where the reply could not be parsed (source "fallback"); the score there
    is 0, the value LSP uses for R_Q in that case (spec B.5).
    """

    sources: list[str]
    completions: list[str]

    @property
    def num_fallbacks(self) -> int:
        return sum(source == "fallback" for source in self.sources)


class SelfJudge:
    """Grade pairs with a frozen model: prompt → ``generate`` → parse.

    ``generate`` maps a list of prompt strings to one completion each, in order. The caller wires it to
    the frozen initial model π_Ref (chat-template wrapping and sampling settings live there; the paper
    does not report them); this class only formats prompts and parses replies.
    """

    def __init__(self, generate: Callable[[list[str]], list[str]], *, prompt: str = SELF_REWARD_PROMPT):
        if "{instruction}" not in prompt or "{response}" not in prompt:
            raise ValueError("the self-reward prompt needs {instruction} and {response} slots")
        self.generate = generate
        self.prompt = prompt

    def prompts(self, queries: list[str], answers: list[str]) -> list[str]:
        check_pairs(queries, answers)
        return [self.prompt.format(instruction=q, response=a) for q, a in zip(queries, answers, strict=True)]

    def __call__(self, queries: list[str], answers: list[str]) -> SelfJudgeBatch:
        prompts = self.prompts(queries, answers)
        if not prompts:
            return SelfJudgeBatch([], [], [], [])
        completions = list(self.generate(prompts))
        if len(completions) != len(prompts) or not all(isinstance(c, str) for c in completions):
            raise ValueError(f"generate must return {len(prompts)} strings, got {len(completions)} items")
        parsed = [parse_quality_score(c) for c in completions]
        return SelfJudgeBatch(
            scores=[float(p.score) for p in parsed],
            valid=[p.source != "fallback" for p in parsed],
            sources=[p.source for p in parsed],
            completions=completions,
        )

    def score(self, query: str, answer: str) -> float:
        return score_one(self, query, answer)
