"""The tests that compare two code paths bit for bit, run again under the other SIMD kernels
PyTorch has for this CPU (ATEN_CPU_CAPABILITY=avx2 and =default).

Bits agree on every machine only when both paths run the same ops in the same order. A test that
passes only because this CPU's kernels happen to round two different computations alike (the
no-grad cross-entropy once used logsumexp - x, the grad path log_softmax: equal under AVX-512,
1 ulp apart under AVX2) fails here, on any CI machine, instead of on a user's AVX2 laptop.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.helper import REPO, cpu_env

BITWISE = [
    "tests/ops/test_cross_entropy.py", "tests/ops/test_adamw.py", "tests/models/test_llm.py",
    "tests/models/test_pipeline.py", "tests/models/test_lora.py", "tests/diffusion/test_ema.py",
]
# The kernel sets below this CPU's best one (ATen cannot pick one above it).
_LEVELS = ["default", "avx2", "avx512"]
_BEST = torch.backends.cpu.get_cpu_capability().lower()
CAPABILITIES = _LEVELS[:_LEVELS.index(_BEST)] if _BEST in _LEVELS[1:] else ["default"]


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_bitwise_tests_hold_under_other_cpu_kernels(capability, tmp_path):
    # torch.compile's on-disk cache does not key on the capability: each run gets its own.
    env = cpu_env() | {"ATEN_CPU_CAPABILITY": capability, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *BITWISE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().lower() == capability  # the override really took effect
