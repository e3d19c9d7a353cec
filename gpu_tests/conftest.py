"""GPU-only suite (`make test-gpu`): needs a CUDA device and a built extension; never skips silently."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        raise pytest.UsageError("gpu_tests need a CUDA GPU (run them on a GPU machine: make test-gpu)")
