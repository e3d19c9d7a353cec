"""The output folder appears whole or not at all; --overwrite replaces it only on success."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megalm.errors import UserError
from megalm.export.cli import parse_size
from megalm.export.outdir import staged_dir


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(str(out), overwrite=True) as work:
            Path(work, "half.bin").write_text("x")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
    with staged_dir(str(out), overwrite=True) as work:
        Path(work, "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]


def test_missing_parents_are_made_and_sizes_are_one_line(tmp_path):
    with staged_dir(str(tmp_path / "a" / "b" / "out")) as work:
        Path(work, "w.txt").write_text("w")
    assert os.listdir(tmp_path / "a" / "b") == ["out"] and os.listdir(tmp_path / "a" / "b" / "out") == ["w.txt"]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot create the parent folder .*file"):
        with staged_dir(str(tmp_path / "file" / "out")):
            pass
    assert parse_size("2GiB", "--max-shard-size") == 2 << 30 and parse_size("500MB", "x") == 500 * 10**6
    with pytest.raises(UserError, match="--max-shard-size: expected a size like 2GB"):
        parse_size("lots", "--max-shard-size")
