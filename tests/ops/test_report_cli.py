"""`megalm ops report` / `megalm ops build` through the real console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megalm.ops.report import OPS

REPO = Path(__file__).resolve().parents[2]


def _megalm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megalm.cli", *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=120)


def test_report_lists_every_op_and_versions():
    r = _megalm("ops", "report")
    assert r.returncode == 0, r.stderr
    for op in OPS:
        assert op in r.stdout
    assert "torch" in r.stdout and "nvcc" in r.stdout and "reference" in r.stdout
    r = _megalm("ops", "report", env={"MEGALM_OPS": "reference"})
    assert "MEGALM_OPS=reference" in r.stdout


def test_build_with_cpu_torch_and_unknown_command_fail_in_one_line():
    import torch

    r = _megalm("ops", "build")
    if torch.version.cuda is None:
        assert r.returncode == 2
        assert r.stderr.strip().count("\n") == 0 and "CPU-only" in r.stderr
    r = _megalm("ops", "frobnicate")
    assert r.returncode == 2 and r.stderr.startswith("error: megalm ops frobnicate")
    r = _megalm("ops", "build", "--arch", "sm_80")
    assert r.returncode == 2 and "--arch" in r.stderr
