"""The trainer's step launches about what a plain loop launches (issue 19: on a GPU it was host-bound,
~5.6x the kernels of a plain loop, mostly DeepSpeed's per-parameter overflow checks and norms).

`benchmarks/opcount_cpu.py` counts every aten op and host read of one optimizer step of `megalm
train` (the shipped gpt2-124m config's defaults, shrunk) and of a plain loop over the same module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed.helper import REPO, cpu_env

pytestmark = pytest.mark.timeout(300)

# Reads of a device value by the host that megalm's step may make beyond the plain loop's. On a GPU
# only the guard's is a device sync: DeepSpeed's clip check reads the CPU tensor megalm hands it.
# (FusedAdamW's step counts as the launches of its CUDA path, whose step counters are CPU tensors.)
EXPECTED_READS = {"train/guard.py", "runtime/utils.py"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("opcount") / "opcount.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "opcount_cpu.py"), "--zero", "0", "1", "2", "3",
                           "--out", str(out)], env=cpu_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["zero_stage"]: r for r in json.loads(out.read_text())["rows"]}


@pytest.mark.parametrize("zero", [0, 1, 3])  # 1: the shipped configs' stage
def test_step_launches_at_most_1_2x_the_plain_loop(rows, zero):
    r = rows[zero]
    assert r["kernels_ratio"] <= 1.2, r
    # DeepSpeed's per-parameter overflow check and per-parameter norms are gone (ZeRO-0: with its
    # bf16 wrapper, whose per-parameter copies and scaling megalm's AdamW with masters replaces).
    for op in ("amax", "amin", "logical_not", "linalg_vector_norm", "pow"):
        assert op not in r["megalm_extra_ops"], (op, r["megalm_extra_ops"])


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_one_device_read_per_step(rows, zero):
    ours, plain = rows[zero]["megalm"]["host_reads_by_site"], rows[zero]["plain_loop"]["host_reads_by_site"]
    extra = {site: n - plain.get(site, 0) for site, n in ours.items() if n > plain.get(site, 0)}
    assert {site.split(":")[0] for site in extra} <= EXPECTED_READS, extra
    guard = [n for site, n in extra.items() if site.startswith("train/guard.py")]
    assert guard == [1], extra
    # DeepSpeed's reads are of its clip factor (a CPU tensor), at most one per group, not per parameter.
    assert sum(n for site, n in extra.items() if site.startswith("runtime/")) <= 2, extra


def test_zero2_stays_within_its_partitioning_cost(rows):
    # ZeRO-2 reduces and partitions gradients every micro batch (bucket copies per parameter); the
    # optimizer step adds nothing per parameter beyond that.
    assert rows[2]["kernels_ratio"] <= 1.35, rows[2]
