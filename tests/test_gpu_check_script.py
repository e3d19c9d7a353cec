"""scripts/gpu_check.sh is the one prepared command of a lent-GPU session: here, without a GPU, it
must refuse in one line before doing anything (and without OUT, say so)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed.helper import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _run(env_extra: dict, tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **env_extra}
    env.pop("OUT", None)
    env.update(env_extra)
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_needs_out(tmp_path):
    r = _run({}, tmp_path)
    assert r.returncode != 0 and "set OUT" in r.stderr


def test_refuses_without_a_gpu_and_writes_nothing_else(tmp_path):
    out = tmp_path / "out"
    r = _run({"OUT": str(out)}, tmp_path)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr, r.stderr
    assert list(out.iterdir()) == []
