"""The scripts and benchmarks outside the package are run by hand or on a GPU machine, not by the
suite: at least each must compile, so a syntax slip is caught here and not on a cluster."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("scripts", "benchmarks", "slurm") for p in (ROOT / d).rglob("*.py"))


def test_there_are_scripts_to_check():
    assert len(FILES) >= 10, FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_compiles(path):
    compile(path.read_text(), str(path), "exec")
