"""SIGKILL of a whole 2-rank `megalm train` run (launcher and ranks, ZeRO-2, async saves), then
resume: nothing corrupt is published, the resumed run starts from the newest valid checkpoint and
ends bit-identical to an uninterrupted run. The kill happens at a barrier (debug.wait_at_step),
not after a sleep; scripts/stress_checkpoint.py (same helpers) kills at random moments."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest

from megalm.checkpoint.layout import step_of
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env

pytestmark = pytest.mark.timeout(1200)


def _stress():
    spec = importlib.util.spec_from_file_location("stress_checkpoint", os.path.join(REPO, "scripts",
                                                                                     "stress_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sigkill_of_the_whole_run_then_resume_is_bit_identical(tmp_path):
    stress = _stress()
    shards = make_corpus(str(tmp_path / "shards"))
    ref = stress.run_reference(str(tmp_path), shards, 8)
    run_dir, log = tmp_path / "runs" / "chain", tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(stress.command(shards, "chain", 8, "debug.wait_at_step=6"), cwd=tmp_path,
                                env=cpu_env(), stdout=out, stderr=subprocess.STDOUT)
        waiting = [run_dir / f"waiting-step6.rank{r}" for r in (0, 1)]
        deadline = time.time() + 900
        while not all(p.exists() for p in waiting):  # both ranks block before step 6: kill there
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert stress.kill_tree(proc) >= 3  # the launcher and both ranks
    valid, corrupt = stress.check_dir(str(run_dir / "checkpoints"))
    assert not corrupt and valid and step_of(valid[-1]) in (2, 4), (valid, corrupt)
    proc = subprocess.run(stress.command(shards, "chain", 8), cwd=tmp_path, env=cpu_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step_of(valid[-1])} " in proc.stdout
    seen = stress.losses(str(run_dir))
    assert {s for s, _ in seen} == set(range(1, 9)) and all(ref["losses"][s] == v for s, v in seen)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["weights_sha256"] == ref["weights"]
