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


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2 --dist loadscope`), with the scope
# of a work unit chosen here: a unit runs whole on one worker. Each test file is a unit (module
# fixtures such as one multi-engine launch stay shared), and so is each folder whose conftest has
# session fixtures (a trained model, a corpus, the one local Slurm cluster), so those are built
# once and the Slurm jobs never race each other. Slurm goes first: its jobs mostly wait, and that
# waiting then overlaps the rest of the suite instead of ending it.
_WHOLE_FOLDERS = ("slurm", "diffusion", "export", "data_prep")
_FIRST = "slurm"


def _scope(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]  # tests/<folder>/<file>.py
    parts = path.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 and parts[1] in _WHOLE_FOLDERS else path


# Seconds each heavy unit took (setup + calls) on 2 cores, 2026-12-08 (`--durations=0`). The
# workers take units in collection order, so longest first (after Slurm) keeps a long unit from
# starting last and running alone at the end; xdist's own reordering (by number of tests) is off.
# A unit not listed counts ~0.3 s per test: a stale figure only costs balance, never coverage.
_SECONDS = {
    "tests/diffusion": 88, "tests/distributed/test_model_parallel.py": 76,
    "tests/checkpoint/test_train_cli.py": 66, "tests/data_prep": 62, "tests/ops/test_cuda_build.py": 95,
    "tests/plan/test_plan.py": 49, "tests/checkpoint/test_manager.py": 49,
    "tests/distributed/test_muon.py": 47, "tests/export": 44, "tests/train/test_cli_claims.py": 38,
    "tests/distributed/test_muon_world.py": 34, "tests/distributed/test_train_modes.py": 32,
    "tests/checkpoint/test_sigkill.py": 28, "tests/launcher/test_mpirun_train.py": 20,
    "tests/test_cpu_capabilities.py": 20, "tests/distributed/test_resume_world.py": 19,
    "tests/train/test_sft.py": 19, "tests/ops/test_selftest.py": 16,
    "tests/benchmarks/test_train_gpu_harness.py": 15, "tests/ops/test_norms_emu.py": 35,
    "tests/ops/test_ops_emu.py": 25, "tests/ops/test_doc_attention_emu.py": 15,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    counts: dict[str, int] = {}
    for item in items:
        counts[_scope(item.nodeid)] = counts.get(_scope(item.nodeid), 0) + 1

    def order(item) -> tuple[bool, float]:
        scope = _scope(item.nodeid)
        return scope != f"tests/{_FIRST}", -_SECONDS.get(scope, 0.3 * counts[scope])
    items.sort(key=order)  # stable: a unit's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling  # only where xdist runs the suite

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Scheduling(config, log)
