"""Prompts with many valid answers and an exactly known target distribution (uniform over them).

Families (each query is one line; every answer is one line):

- ``number_range``: "Write a number between 23 and 41." -> any integer a..b inclusive, written in
  decimal without leading zeros; target uniform over the b − a + 1 integers;
- ``letter_digit``: "Write a letter from c to f, then a digit from 2 to 4." -> the letter,
  then the digit, e.g. "d3"; target uniform over the product (letters × digits), i.e. a uniform letter
  and an independent uniform digit;
- ``shuffle``: "Shuffle the letters of plum." -> any distinct permutation of the word's letters
  (the word itself included); target uniform over them (n! for n distinct letters). It needs a copy
  mechanism that the 64-wide proving-ground model does not learn within a few hundred SFT steps.

A training row holds ONE response per prompt, drawn uniformly from the target: over the draw of the
data, y ~ p_data(·|x), which is what SPIN's fixed point π_θ = p_data refers to. ``support(query)``
lists the exact valid answers, so a model's distribution on them can be enumerated.
"""

from __future__ import annotations

import itertools
import random
import re

DISTRIBUTION_FAMILIES = ("number_range", "letter_digit", "shuffle")

_RANGE = re.compile(r"^Write a number between (\d{1,4}) and (\d{1,4})\.$")
_LETTER_DIGIT = re.compile(r"^Write a letter from ([a-z]) to ([a-z]), then a digit from (\d) to (\d)\.$")
_SHUFFLE = re.compile(r"^Shuffle the letters of ([a-z]{1,6})\.$")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_query(rng: random.Random, family: str, *, max_start: int = 199, widths: tuple[int, int] = (4, 20),
               letter_widths: tuple[int, int] = (2, 5), digit_widths: tuple[int, int] = (2, 4),
               word_lengths: tuple[int, int] = (3, 4)) -> str:
    """One query of ``family``: a range of ``widths`` integers starting in 0..max_start; a range of
    ``letter_widths`` letters and one of ``digit_widths`` digits; or a word of ``word_lengths``
    distinct letters."""
    if family == "number_range":
        width = rng.randint(*widths)
        a = rng.randint(0, max_start)
        return f"Write a number between {a} and {a + width - 1}."
    if family == "letter_digit":
        lw, dw = rng.randint(*letter_widths), rng.randint(*digit_widths)
        first, low = rng.randint(0, 26 - lw), rng.randint(0, 10 - dw)
        return (f"Write a letter from {_LETTERS[first]} to {_LETTERS[first + lw - 1]}, "
                f"then a digit from {low} to {low + dw - 1}.")
    if family == "shuffle":
        word = "".join(rng.sample(_LETTERS, rng.randint(*word_lengths)))
        return f"Shuffle the letters of {word}."
    raise ValueError(f"unknown distribution family {family!r}; expected one of {DISTRIBUTION_FAMILIES}")


def family(query: str) -> str | None:
    """The family of a query, or None if it has no known shape."""
    if _RANGE.match(query):
        return "number_range"
    if _LETTER_DIGIT.match(query):
        return "letter_digit"
    if _SHUFFLE.match(query):
        return "shuffle"
    return None


def support(query: str) -> list[str] | None:
    """The exact valid answers of a query (sorted, distinct), or None if it has no known shape."""
    if m := _RANGE.match(query):
        a, b = int(m.group(1)), int(m.group(2))
        return [str(v) for v in range(a, b + 1)] if a <= b else None
    if m := _LETTER_DIGIT.match(query):
        first, last, low, high = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        letters = _LETTERS[_LETTERS.index(first) : _LETTERS.index(last) + 1]
        return [f"{c}{d}" for c in letters for d in range(low, high + 1)] if letters and low <= high else None
    if m := _SHUFFLE.match(query):
        return sorted({"".join(p) for p in itertools.permutations(m.group(1))})
    return None


def is_valid(query: str, answer: str) -> bool:
    """True iff ``answer`` is exactly (no surrounding whitespace) one of the query's valid answers."""
    valid = support(query)
    return valid is not None and answer in set(valid)


def make_rows(n: int, seed: int, families: tuple[str, ...] = DISTRIBUTION_FAMILIES, **shape) -> list[dict]:
    """``n`` chat rows (``messages`` format), families in turn, distinct queries, each with one
    response drawn uniformly from its support. ``shape``: ``make_query``'s keywords."""
    from sparring.tasks.problems import distinct_rows

    return distinct_rows(n, random.Random(seed), families, lambda rng, family: make_query(rng, family, **shape),
                         lambda rng, query: rng.choice(support(query)), f"with {shape or 'the default shape'}")

