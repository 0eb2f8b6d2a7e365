"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from sparring.tasks import build_tokenizer


@pytest.fixture(scope="session")
def tok():
    """The proving ground's character tokenizer (with its chat template)."""
    return build_tokenizer()
