"""Small text tasks whose exact answer a program can compute and check.

Families (each query is one line; the answer is one line):

- ``add``:     "What is 47 + 38?"        -> "85"
- ``sort``:    "Sort the digits 7 3 9 1." -> "1 3 7 9"
- ``reverse``: "Reverse the word plum."   -> "mulp"
- ``add_lsd``: "What is 347 + 58, least significant digit first?" -> "504" (405 written backwards:
  the order in which carries propagate, so a small model can learn it digit by digit)

``solve(query)`` parses any query of these shapes (also ones the model writes itself, as LSP's
challenger does) and returns the exact answer, or None when the query is not a task it knows.

Difficulty d (optional; None keeps each family's default ranges): ``add`` / ``add_lsd`` operands of
exactly d digits (d = 1: 0–9), ``sort`` d digits, ``reverse`` a word of d letters.
``difficulty_of(query)`` reads d back (for ``add``: the longer operand's digit count).
"""

from __future__ import annotations

import random
import re

FAMILIES = ("add", "sort", "reverse")  # the default mix; ALL_FAMILIES lists every family
ALL_FAMILIES = (*FAMILIES, "add_lsd")

_ADD = re.compile(r"^\s*What is (\d{1,6}) \+ (\d{1,6})\?\s*$")
_SORT = re.compile(r"^\s*Sort the digits ((?:\d )*\d)\.\s*$")
_ADD_LSD = re.compile(r"^\s*What is (\d{1,6}) \+ (\d{1,6}), least significant digit first\?\s*$")
_REVERSE = re.compile(r"^\s*Reverse the word ([a-z]{1,16})\.\s*$")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _operand(rng: random.Random, default_max: int, difficulty: int | None) -> int:
    """Uniform on 0..default_max, or on the d-digit numbers 10^(d−1)..10^d − 1 (d = 1: 0..9)."""
    if difficulty is None:
        return rng.randint(0, default_max)
    return rng.randint(0 if difficulty == 1 else 10 ** (difficulty - 1), 10**difficulty - 1)


def make_problem(rng: random.Random, family: str, difficulty: int | None = None) -> tuple[str, str]:
    """One (query, answer) pair of the given family, drawn with ``rng``; ``difficulty`` d (see the
    module docstring) fixes the operands' digits, the digit count or the word length."""
    if difficulty is not None and not 1 <= difficulty <= (16 if family == "reverse" else 6):
        raise ValueError(f"difficulty {difficulty} is out of range for {family!r}")
    length = (lambda lo, hi: rng.randint(lo, hi)) if difficulty is None else (lambda lo, hi: difficulty)
    if family == "add":
        a, b = _operand(rng, 99, difficulty), _operand(rng, 99, difficulty)
        query = f"What is {a} + {b}?"
    elif family == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(length(3, 6))]
        query = f"Sort the digits {' '.join(digits)}."
    elif family == "add_lsd":
        a, b = _operand(rng, 999, difficulty), _operand(rng, 999, difficulty)
        query = f"What is {a} + {b}, least significant digit first?"
    elif family == "reverse":
        word = "".join(rng.choice(_LETTERS) for _ in range(length(3, 6)))
        query = f"Reverse the word {word}."
    else:
        raise ValueError(f"unknown task family {family!r}; expected one of {ALL_FAMILIES}")
    answer = solve(query)
    assert answer is not None
    return query, answer


def difficulty_of(query: str) -> int | None:
    """d of a parseable query: the longer operand's digits (add, add_lsd), the digit count (sort),
    the word length (reverse); None when ``solve`` cannot parse it."""
    if (m := _ADD.match(query)) or (m := _ADD_LSD.match(query)):
        return max(len(m.group(1)), len(m.group(2)))
    if m := _SORT.match(query):
        return len(m.group(1).split())
    if m := _REVERSE.match(query):
        return len(m.group(1))
    return None


def solve(query: str) -> str | None:
    """The exact answer to a proving-ground query, or None if the query has no known shape."""
    if m := _ADD.match(query):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := _ADD_LSD.match(query):
        return str(int(m.group(1)) + int(m.group(2)))[::-1]
    if m := _SORT.match(query):
        return " ".join(sorted(m.group(1).split()))
    if m := _REVERSE.match(query):
        return m.group(1)[::-1]
    return None


def check(query: str, answer: str) -> bool | None:
    """True/False for a right/wrong answer (surrounding whitespace ignored); None if unparseable."""
    expected = solve(query)
    if expected is None:
        return None
    return answer.strip() == expected


def make_rows(n: int, seed: int, families: tuple[str, ...] = FAMILIES, difficulty: int | None = None) -> list[dict]:
    """``n`` chat rows in the ``messages`` format, families in turn, distinct queries (of
    ``difficulty``, None: the default ranges). Raises ValueError when there are too few distinct ones."""
    return distinct_rows(n, random.Random(seed), families, lambda rng, family: make_problem(rng, family, difficulty)[0],
                         lambda rng, query: solve(query), f"at difficulty {difficulty}")


def distinct_rows(n: int, rng: random.Random, families: tuple[str, ...], query_of, answer_of, what: str) -> list[dict]:
    """``n`` chat rows (``messages`` format), families in turn, distinct queries: ``query_of(rng, family)``
    is drawn until it is new, then ``answer_of(rng, query)`` (only then: a rejected duplicate costs no
    answer draw). Raises ValueError (naming ``what``) when there are too few distinct queries."""
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct queries of {families} {what}")
        query = query_of(rng, families[len(rows) % len(families)])
        if query in seen:
            continue
        seen.add(query)
        answer = answer_of(rng, query)
        rows.append({"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]})
    return rows
