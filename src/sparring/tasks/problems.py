"""Small text tasks whose exact answer a program can compute and check.

Families (each query is one line; the answer is one line):

- ``add``:     "What is 47 + 38?"        -> "85"
- ``sort``:    "Sort the digits 7 3 9 1." -> "1 3 7 9"
- ``reverse``: "Reverse the word plum."   -> "mulp"
- ``add_lsd``: "What is 347 + 58, least significant digit first?" -> "504" (405 written backwards:
  the order in which carries propagate, so a small model can learn it digit by digit)

``solve(query)`` parses any query of these shapes (also ones the model writes itself, as LSP's
challenger does) and returns the exact answer, or None when the query is not a task it knows.
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


def make_problem(rng: random.Random, family: str) -> tuple[str, str]:
    """One (query, answer) pair of the given family, drawn with ``rng``."""
    if family == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        query = f"What is {a} + {b}?"
    elif family == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        query = f"Sort the digits {' '.join(digits)}."
    elif family == "add_lsd":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        query = f"What is {a} + {b}, least significant digit first?"
    elif family == "reverse":
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
        query = f"Reverse the word {word}."
    else:
        raise ValueError(f"unknown task family {family!r}; expected one of {ALL_FAMILIES}")
    answer = solve(query)
    assert answer is not None
    return query, answer


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


def make_rows(n: int, seed: int, families: tuple[str, ...] = FAMILIES) -> list[dict]:
    """``n`` chat rows in the ``messages`` format, families in turn, distinct queries."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        query, answer = make_problem(rng, families[len(rows) % len(families)])
        if query in seen:
            continue
        seen.add(query)
        rows.append({"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]})
    return rows
