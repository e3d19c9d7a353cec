"""CI compile check: every kernel must compile for sm_80 and sm_90 (+ PTX for newer GPUs) with a
CUDA build of torch.

Runs `.venv-cuda/bin/python -m megalm.ops.build --arch "8.0;9.0+PTX"` (the CPU .venv cannot compile
CUDA). The build is cached by a hash of the sources, so unchanged kernels are not rebuilt; the
first build takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA_PY = REPO / ".venv-cuda" / "bin" / "python"
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
# Kept in the repo's ignored build/ (removed by `make clean`) unless the user chose a cache.
CACHE = os.environ.get("MEGALM_OPS_CACHE", str(REPO / "build" / "ops-cache"))
ARCH = "8.0;9.0+PTX"  # the default of `megalm ops build`


def _build():
    env = {**os.environ, "CUDA_HOME": CUDA_HOME, "MEGALM_OPS_CACHE": CACHE, "MAX_JOBS": "2",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([str(CUDA_PY), "-m", "megalm.ops.build", "--arch", ARCH], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)


def _cuobjdump():
    found = shutil.which("cuobjdump") or shutil.which(str(Path(CUDA_HOME) / "bin" / "cuobjdump"))
    if found:
        return found
    # triton (a dependency of the CUDA torch wheel) ships one
    hits = sorted((REPO / ".venv-cuda").glob("lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump"))
    return str(hits[0]) if hits else None


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_kernels_compile_for_sm80_sm90_and_ptx():
    if not CUDA_PY.exists():
        pytest.fail(".venv-cuda missing: `make test` creates it (make cuda-venv)")
    if not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        pytest.fail(f"no nvcc under CUDA_HOME={CUDA_HOME}: the CUDA compile check needs it")
    r = _build()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    build_dir = Path(r.stdout.strip().splitlines()[-1])
    so = build_dir / "megalm_ops_C.so"
    info = json.loads((build_dir / "build.json").read_text())
    from megalm.ops.build import DEFAULT_ARCH, fatbin_archs, parse_arch

    assert parse_arch(DEFAULT_ARCH) == parse_arch(ARCH)
    assert so.exists() and info["archs"] == ["8.0", "9.0+PTX"]
    embedded = fatbin_archs(so)
    assert {"sm_80", "sm_90", "compute_90"} <= set(embedded), embedded
    assert "no CUDA device visible: kernels not self-tested" in r.stdout
    tool = _cuobjdump()
    if tool:  # independent check when a cuobjdump is around
        listing = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
        ptx = subprocess.run([tool, "--list-ptx", str(so)], capture_output=True, text=True).stdout
        assert "sm_90" in ptx, ptx
    # Unchanged sources: the second call is a cache hit and leaves the binary alone.
    mtime = so.stat().st_mtime_ns
    r2 = _build()
    assert r2.returncode == 0 and "up to date" in r2.stdout, r2.stdout + r2.stderr
    assert so.stat().st_mtime_ns == mtime
    assert not list(build_dir.parent.glob(".tmp-*")), "a temp build dir was left behind"
