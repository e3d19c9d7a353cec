"""Suite-wide policy: in CI (CI=true) a skipped test is a failure — nothing may be skipped there.

GPU-only checks live outside this suite (gpu_tests/, run with `make test-gpu` on a GPU machine),
so everything collected here must run on a 2-core CPU machine.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must run everything: {reason}"
