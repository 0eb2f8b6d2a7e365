"""Fixtures of the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.helpers import write_reward_module


@pytest.fixture
def reward_dir(tmp_path, monkeypatch) -> Path:
    """The LSP tests' reward module, importable here and in the subprocess runs this test starts."""
    folder = write_reward_module(tmp_path / "reward_pkg")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder
