"""Free space and checkpoint-size estimates on a real small filesystem."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from megalm.checkpoint.space import estimate_bytes, free_bytes, human, volume_of


@pytest.fixture
def vol(tmp_path):
    where = tmp_path / "vol"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_volume_and_free_bytes_of_a_path_not_yet_created(vol):
    target = vol / "runs" / "x" / "checkpoints"
    assert volume_of(str(target)) == str(vol)
    before = free_bytes(str(target))
    assert 900_000 < before <= 1 << 20
    (vol / "blob").write_bytes(os.urandom(300_000))
    assert before - free_bytes(str(target)) >= 300_000


def test_estimate_counts_weights_master_copy_and_adam_moments():
    class Engine:
        module = torch.nn.Linear(10, 10)  # 110 parameters

    assert estimate_bytes(Engine()) == 110 * (4 + 8)  # fp32 weights: no separate master copy
    Engine.module = Engine.module.to(torch.bfloat16)
    assert estimate_bytes(Engine()) == 110 * (2 + 4 + 8)
    assert human(1_500_000) == "1.5 MB" and human(12) == "12 B"
