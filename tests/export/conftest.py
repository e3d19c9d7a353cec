"""One ZeRO-3 and one 2-stage pipeline checkpoint for every export test (trained once per session)."""

from __future__ import annotations

import pytest

from tests.distributed.corpus import make_corpus
from tests.distributed.helper import run_distributed


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, str]:
    """{"zero3": run dir, "pp2": run dir, "shards": shard dir}."""
    root = tmp_path_factory.mktemp("export-runs")
    shards = make_corpus(str(root / "shards"))
    runs = run_distributed("tests.export.jobs:make_checkpoints", {"workdir": str(root), "shards": shards}, nproc=2)[0]
    return {**runs, "shards": shards}
