import os
import sys
from pathlib import Path

import pytest

from .conftest import run_prep, tree_digest

MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.mpi
def test_two_mpi_ranks_match_one_process(tmp_path, corpus, model_path):
    args = [str(corpus), "--tokenizer", str(model_path), "--shard-size-mb", "0.05",
            "--valid-fraction", "0.05", "--dedup"]
    run_prep(*args, "-o", tmp_path / "single")
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    proc = subprocess.run(
        [str(MPIEXEC), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
         "-m", "megalm.cli", "prep", *args, "-o", str(tmp_path / "mpi"), "--workers", "2"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The summary is printed once (rank 0) and the work was split across ranks.
    assert proc.stdout.count("documents:") == 1
    assert "parallel: 2 rank(s) x 2 worker(s)" in proc.stdout
    assert tree_digest(tmp_path / "mpi") == tree_digest(tmp_path / "single")
