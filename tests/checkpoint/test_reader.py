"""The reader's resolution of what a user points `megalm sample` (or export) at."""

from __future__ import annotations

import pytest

from megalm.checkpoint.reader import resolve
from megalm.errors import UserError


@pytest.mark.parametrize("make, expect", [
    (lambda p: p / "nope", "no such checkpoint"),
    (lambda p: (p / "f").write_text("x") and p / "f", "is a file"),
    (lambda p: (p / "checkpoints").mkdir() or p / "checkpoints", "holds no checkpoint yet"),
    (lambda p: (p / "run" / "checkpoints").mkdir(parents=True) or p / "run", "holds no checkpoint yet"),
    (lambda p: (p / "step_00000002").mkdir() or p / "step_00000002", "not loadable (no completion marker)"),
])
def test_each_wrong_target_is_one_clear_line(tmp_path, make, expect):
    target = make(tmp_path)
    with pytest.raises(UserError) as info:
        resolve(str(target))
    assert expect in str(info.value) and "\n" not in str(info.value)
