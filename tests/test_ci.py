"""CI plumbing: tests/conftest.py's policy, run on a throwaway suite (under CI=true every skip,
xfail, xpass and collection-time skip is a failure; outside CI they keep their usual meaning), and
the environment .ci/run hands to `make test`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"

CASES = {
    "test_a.py": """
import pytest

def test_ok():
    pass

def test_skip():
    pytest.skip("nope")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="maybe")
def test_xpass():
    pass

def test_imperative_xfail():
    pytest.xfail("later")
""",
    "test_b.py": 'import pytest\npytest.skip("whole module", allow_module_level=True)\n\ndef test_x():\n    pass\n',
    "test_c.py": 'import pytest\npytest.importorskip("no_such_module_megalm")\n\ndef test_y():\n    pass\n',
}


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repo's config
    for name, text in CASES.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ci_fails_skips_xfails_and_collection_skips(tmp_path):
    r = _run(tmp_path, "true")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert out.rstrip().splitlines()[-1].startswith("4 failed, 1 passed, 2 errors"), out
    for line in ("FAILED test_a.py::test_skip - skipped in CI",
                 "FAILED test_a.py::test_xfail - xfailed in CI",
                 "FAILED test_a.py::test_xpass - xpassed in CI",
                 "FAILED test_a.py::test_imperative_xfail - xfailed in CI",
                 "ERROR test_b.py - test_b.py: skipped at collection in CI",
                 "ERROR test_c.py - test_c.py: skipped at collection in CI"):
        assert line in out, out


def test_outside_ci_skips_and_xfails_keep_their_meaning(tmp_path):
    r = _run(tmp_path, "")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert out.rstrip().splitlines()[-1].startswith("1 passed, 3 skipped, 2 xfailed, 1 xpassed"), out


def _ci_run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What `make` sees when .ci/run calls it (a stand-in `make` prints its environment)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "make").write_text("#!/bin/sh\nenv\n")
    (fake / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MEGALM_OPS_CACHE"}
    env.update(HOME=str(tmp_path / "home"), CUDA_HOME=str(tmp_path / "cuda"),
               PATH=f"{fake}{os.pathsep}{env.get('PATH', '')}", **extra)
    r = subprocess.run(["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def test_ci_run_keeps_the_compiled_ops_cache_outside_the_clone(tmp_path):
    # Under the clone's build/ a clean clone would recompile every kernel on every CI run.
    seen = _ci_run_env(tmp_path)
    assert seen["MEGALM_OPS_CACHE"] == str(tmp_path / "home" / ".cache" / "megalm" / "ops")
    assert seen["CI"] == "true"
    assert _ci_run_env(tmp_path, MEGALM_OPS_CACHE="/elsewhere")["MEGALM_OPS_CACHE"] == "/elsewhere"
