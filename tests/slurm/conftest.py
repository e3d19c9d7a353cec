"""One local Slurm cluster for the whole session (started here unless one is already running
from the same directory, e.g. by `make test`; stopped only if started here)."""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import INSTALL_HINT, Cluster, slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster():
    if not slurm_installed():
        # tests/conftest.py turns this skip into a failure in CI, where Slurm must be installed.
        pytest.skip(f"Slurm is not installed: {INSTALL_HINT}")
    saved = os.environ.get("SLURM_CONF")
    cluster = Cluster.start()
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="session")
def slurm_workdir(tmp_path_factory):
    """One working dir per session: the corpus is built once, runs get their own names."""
    return tmp_path_factory.mktemp("slurm")
