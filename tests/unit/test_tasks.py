"""The proving ground's task families: every generated problem is solved and checked by the program."""

from __future__ import annotations

import random

import pytest

from sparring.tasks.problems import ALL_FAMILIES, check, make_problem, make_rows, solve


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_problem_of_a_family_is_parsed_and_checked(family):
    rng = random.Random(1)
    for _ in range(50):
        query, answer = make_problem(rng, family)
        assert solve(query) == answer and check(query, f" {answer}\n") is True and check(query, answer + "0") is False


def test_add_lsd_writes_the_sum_least_significant_digit_first():
    assert solve("What is 347 + 58, least significant digit first?") == "504"  # 405 backwards
    assert solve("What is 5 + 5, least significant digit first?") == "01"
    assert solve("What is 5 + 5?") == "10" and solve("Add 5 and 5.") is None


def test_rows_cycle_through_the_families_without_repeats():
    rows = make_rows(40, seed=3, families=ALL_FAMILIES)
    queries = [r["messages"][0]["content"] for r in rows]
    assert len(set(queries)) == 40 and "least significant digit first" in queries[3]
