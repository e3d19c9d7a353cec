"""The same `megalm train` command under `megalm launch` (torchrun's variables) and under a real
`mpiexec -n 2` with no MASTER_ADDR/MASTER_PORT (rank 0 picks them and broadcasts over mpi4py):
both train the same model to bit-identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.corpus import make_corpus
from tests.distributed.helper import cpu_env
from tests.distributed.jobs import small_overrides

MPIEXEC = Path(sys.executable).parent / "mpiexec"
TRAIN = [sys.executable, "-m", "megalm.cli", "train"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.mpi
def test_train_under_mpiexec_matches_megalm_launch(tmp_path):
    shards = make_corpus(str(tmp_path / "shards"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel: {zero_stage: 2}\n")
    env = {k: v for k, v in cpu_env().items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "MASTER_", "RANK", "WORLD_SIZE"))}

    launch = subprocess.run([sys.executable, "-m", "megalm.cli", "launch", "--nproc", "2", "--", *TRAIN, str(cfg),
                             *small_overrides(shards, "launch")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert launch.returncode == 0, launch.stderr[-3000:]
    mpi = subprocess.run([str(MPIEXEC), "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "PYTHONPATH",
                          "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", *TRAIN, str(cfg),
                          *small_overrides(shards, "mpi")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    a, b = _summary(tmp_path / "runs/launch"), _summary(tmp_path / "runs/mpi")
    assert a["finished"] and b["finished"] and a["world_size"] == b["world_size"] == 2
    assert a["weights_sha256"] == b["weights_sha256"]
