"""Suite-wide policy: in CI (CI=true) nothing may be skipped or xfailed — each is a failure there:
a skipped test, an xfail (failing as expected, or passing unexpectedly), and a skip raised while
collecting a module (module-level `pytest.skip(..., allow_module_level=True)`, `importorskip`).

GPU-only checks live outside this suite (gpu_tests/, run with `make test-gpu` on a GPU machine),
so everything collected here must run on a 2-core CPU machine.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reason(longrepr) -> str:
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI:
        return
    if hasattr(report, "wasxfail"):
        if report.skipped or report.passed:  # xfailed, or xpassed (non-strict)
            what = "xfailed" if report.skipped else "xpassed"
            reason = report.wasxfail
            del report.wasxfail  # else the terminal would still count it as xfailed/xpassed
            report.outcome = "failed"
            report.longrepr = f"{what} in CI, which must run everything and expect it to pass: {reason}"
    elif report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run everything: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # Here rather than in pytest_collectreport: this wrapper edits the report before any plugin
    # (the terminal's counts, the session's exit status) sees it.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid}: skipped at collection in CI, which must run everything: " \
                          f"{_reason(report.longrepr)}"
