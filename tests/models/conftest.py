"""Model tests use tensors of a few KB: one intra-op thread is faster than two fighting over a
loaded 2-core machine (measured ~3x less CPU time), and it is restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
