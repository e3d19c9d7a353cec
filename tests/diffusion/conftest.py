"""Shared fixture: the digits as image shards, prepared once per test session."""

from __future__ import annotations

import pytest

from megalm.cli import main as cli


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    assert cli(["prep", "builtin:digits", "-o", str(out)]) == 0
    return str(out)
