"""`megalm ops report` / `megalm ops build` through the CLI dispatcher (and once the real script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megalm import cli
from megalm.ops.report import OPS

REPO = Path(__file__).resolve().parents[2]


def test_report_through_the_console_script():
    r = subprocess.run([str(Path(sys.executable).parent / "megalm"), "ops", "report"], cwd=REPO,
                       text=True, capture_output=True, timeout=300,
                       env={**os.environ, "MEGALM_OPS": "reference"})
    assert r.returncode == 0, r.stderr
    for op in OPS:
        assert op in r.stdout
    assert "MEGALM_OPS=reference" in r.stdout and "nvcc" in r.stdout


def test_report_lists_every_op_and_versions(capsys, monkeypatch):
    monkeypatch.delenv("MEGALM_OPS", raising=False)
    assert cli.main(["ops", "report"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    assert torch.__version__ in out and "reference" in out and "cache" in out


def test_build_errors_are_one_line(capsys):
    if torch.version.cuda is None:
        assert cli.main(["ops", "build"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "CPU-only" in err
    assert cli.main(["ops", "frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("error: megalm ops frobnicate")
    assert cli.main(["ops", "build", "--arch", "sm_80"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--arch" in err
    assert cli.main(["ops", "--help"]) == 0 and "report" in capsys.readouterr().out
