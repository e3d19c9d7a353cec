"""`--resume` policy: which checkpoint a mode means, and the one-line refusals."""

from __future__ import annotations

import pytest

from megalm.checkpoint.resume import plan
from megalm.errors import UserError


@pytest.fixture
def own(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        (ck / f"step_{step:08d}").mkdir(parents=True)
    return ck


def test_auto_none_and_paths(tmp_path, own):
    assert plan(str(own), "auto") == (str(own), None)
    assert plan(str(tmp_path / "fresh"), "none") is None
    assert plan(str(own), str(own / "step_00000004")) == (str(own), "step_00000004")
    other = tmp_path / "other" / "step_00000007"
    other.mkdir(parents=True)
    assert plan(str(tmp_path / "fresh"), str(other)) == (str(other.parent), "step_00000007")


@pytest.mark.parametrize("mode, expect", [
    ("none", "already holds checkpoints of a run (newest step_00000004)"),
    ("{own}/step_00000002", "holds newer checkpoints (newest step_00000004)"),
    ("{tmp}/missing/step_00000009", "step_00000009 does not exist"),
    ("{tmp}/afile", "is a file"),
    ("{own}", "expected a checkpoint folder named like step_00000100, got 'checkpoints'"),
    ("{tmp}/other/step_00000007", "already holds checkpoints of another run"),
])
def test_refusals_are_one_line(tmp_path, own, mode, expect):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "other" / "step_00000007").mkdir(parents=True)
    with pytest.raises(UserError) as info:
        plan(str(own), mode.format(own=own, tmp=tmp_path))
    assert expect in str(info.value) and "\n" not in str(info.value), str(info.value)
