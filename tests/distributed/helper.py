"""Run a function on N real gloo ranks (via `megalm launch`) and report every rank's failure.

    results = run_distributed("tests.distributed.jobs:train_modes", {"workdir": ...}, nproc=2)

Each rank imports `module:function`, calls it with the JSON kwargs after the process group is up
(the trainer's own `init_distributed`), and writes its JSON-able return value or its traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def run_distributed(target: str, kwargs: dict[str, Any], nproc: int = 2, timeout: float = 600) -> list[Any]:
    out = tempfile.mkdtemp(prefix="megalm-dist-")
    cmd = [sys.executable, "-m", "megalm.cli", "launch", "--nproc", str(nproc), "--",
           sys.executable, "-m", "tests.distributed._runner", target, json.dumps(kwargs), out]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    results, problems = [], []
    for rank in range(nproc):
        path = os.path.join(out, f"rank{rank}.json")
        if not os.path.exists(path):
            problems.append(f"rank {rank}: no result (killed or hung)")
            continue
        rec = json.loads(Path(path).read_text())
        if rec["ok"]:
            results.append(rec["result"])
        else:
            problems.append(f"rank {rank} failed:\n{rec['traceback']}")
    if proc.returncode or problems:
        tail = proc.stderr[-4000:]
        raise AssertionError(f"{target} on {nproc} ranks: launcher exit {proc.returncode}\n"
                             + "\n".join(problems) + f"\n--- stderr tail ---\n{tail}")
    return results


def assert_exact_resume(r: dict[str, Any]) -> None:
    """A train_modes-style record: 2 steps + a new engine resuming + 2 steps == 4 straight steps."""
    assert r["first"]["step"] == 2 and not r["first"]["finished"]
    assert r["second"]["finished"] and r["second"]["step"] == 4
    assert r["split_losses"] == r["straight_losses"]  # exact float equality
    assert r["second"]["weights_sha256"] == r["straight"]["weights_sha256"]
