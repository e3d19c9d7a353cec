"""Self-test before trust, on CPU: the extension is replaced by the torch model of the binding
contract (tests/ops/test_cuda_plumbing.py) with ONE deliberately broken entry point; the
self-test must catch exactly that kernel, record it, and `auto` must route around it."""

from __future__ import annotations

import json

import pytest
import torch

from megalm.ops import _backend, layer_norm, report, rms_norm, rms_norm_reference, selftest
from megalm.ops.registry import KERNELS
from tests.ops.test_cuda_plumbing import ContractModel

CPU = torch.device("cpu")


class BrokenRMSNorm(ContractModel):
    """Every entry point right except rms_norm_fwd, which is 1% off."""
    calls: list[str] = []

    @staticmethod
    def rms_norm_fwd(x, w, eps):
        y, rstd = ContractModel.rms_norm_fwd(x, w, eps)
        return (y.float() * 1.01).to(y.dtype), rstd

    @staticmethod
    def layer_norm_fwd(x, w, b, eps):
        BrokenRMSNorm.calls.append("layer_norm_fwd")
        return ContractModel.layer_norm_fwd(x, w, b, eps)


def _as_broken_build(monkeypatch, where):
    """CPU tensors count as kernel tensors, and the 'loaded build' is BrokenRMSNorm in `where`."""
    monkeypatch.delenv("MEGALM_OPS", raising=False)
    monkeypatch.setattr(_backend, "_load", lambda: (BrokenRMSNorm, "", where))
    monkeypatch.setattr(_backend, "kernel_device", lambda t: True)
    selftest._verdicts.cache_clear()
    _backend._warn_untrusted_once.cache_clear()
    BrokenRMSNorm.calls.clear()


@pytest.fixture(scope="module")
def first_record(tmp_path_factory):
    """One full self-test run (~30 s on 2 cores), shared by the tests below."""
    where = tmp_path_factory.mktemp("build")
    with pytest.MonkeyPatch.context() as mp:
        _as_broken_build(mp, where)
        record = selftest.run_all(CPU, where)
    selftest._verdicts.cache_clear()
    return where, record


@pytest.fixture
def broken_build(first_record, tmp_path, monkeypatch):
    """A fresh process's view of a build whose record is already on disk."""
    (tmp_path / "selftest").mkdir()
    src = first_record[0] / "selftest" / "cpu.json"
    (tmp_path / "selftest" / "cpu.json").write_text(src.read_text())
    _as_broken_build(monkeypatch, tmp_path)
    yield tmp_path
    selftest._verdicts.cache_clear()
    _backend._warn_untrusted_once.cache_clear()


def test_selftest_catches_the_broken_kernel_and_records_per_device(first_record):
    where, record = first_record
    verdicts = {name: res["ok"] for name, res in record["kernels"].items()}
    assert verdicts == {k.name: k.name != "rms_norm" for k in KERNELS}
    assert "kernel err" in record["kernels"]["rms_norm"]["detail"]
    assert all(res["cases"] > 0 for res in record["kernels"].values())
    on_disk = json.loads((where / "selftest" / "cpu.json").read_text())
    assert on_disk["kernels"] == json.loads(json.dumps(record["kernels"]))


def test_auto_falls_back_only_for_the_failed_kernel_with_one_warning(broken_build, capfd):
    (broken_build / "selftest" / "cpu.json").unlink()  # nothing checked yet: first use self-tests
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
    y = rms_norm(x, w)  # first use: self-tests everything, then routes around rms_norm
    assert torch.equal(y, rms_norm_reference(x, w))
    rms_norm(x, w)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "rms_norm" in err and "self-test" in err
    assert not torch.equal(rms_norm(x, w, backend="cuda"), y)  # forcing still runs the kernel
    layer_norm(x, w, None)
    assert BrokenRMSNorm.calls[-1] == "layer_norm_fwd"  # a kernel that passed is used
    assert (broken_build / "selftest" / "cpu.json").exists()


def test_a_recorded_verdict_is_reused_without_rerunning(broken_build, monkeypatch):
    def no_rerun(*a, **k):
        raise AssertionError("self-tests ran again although a record exists")

    monkeypatch.setattr(selftest, "run_all", no_rerun)
    assert selftest.verdict("rms_norm", CPU)[0] is False
    assert selftest.verdict("swiglu", CPU) == (True, selftest.read_record(broken_build, CPU)
                                               ["kernels"]["swiglu"]["detail"])


def test_missing_entry_point_fails_that_kernel_only(broken_build, monkeypatch):
    class NoSwiGLUBwd(ContractModel):
        swiglu_bwd = None

    del NoSwiGLUBwd.swiglu_bwd
    monkeypatch.setattr(_backend, "_load", lambda: (type("M", (), {
        k: getattr(ContractModel, k) for k in dir(ContractModel) if not k.startswith("_")
        and k != "swiglu_bwd"}), "", broken_build))
    res = selftest.run_kernel(next(k for k in KERNELS if k.name == "swiglu"), CPU)
    assert res["ok"] is False and "swiglu_bwd" in res["detail"]


def test_report_table_has_the_self_test_column(first_record):
    record = first_record[1]
    lines = report.kernel_table(BrokenRMSNorm, "", record, has_gpu=True, arch="8.0;9.0+PTX")
    header = lines[0]
    assert "self-test" in header and "built" in header and "arch" in header
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {k.name for k in KERNELS}
    assert "FAIL" in rows["rms_norm"] and "reference (self-test failed" in rows["rms_norm"]
    assert "pass" in rows["layer_norm"] and rows["layer_norm"].rstrip().endswith("cuda kernel")
    cpu_lines = report.kernel_table(None, "no CUDA device visible", None, has_gpu=False, arch="-")
    assert all("no GPU" in line for line in cpu_lines[1:])


@pytest.mark.parametrize("broken", ["no-op", "moments not stored"])
def test_adamw_self_test_fails_a_kernel_that_does_too_little(broken, monkeypatch, tmp_path):
    class BadAdam(ContractModel):
        @staticmethod
        def multi_tensor_adamw(ps, gs, ms, vs, masters, *hyper):
            if broken == "no-op":
                return
            saved = [m.clone() for m in ms]
            ContractModel.multi_tensor_adamw(ps, gs, ms, vs, masters, *hyper)
            for m, s in zip(ms, saved):
                m.copy_(s)  # params updated, first moment never written back

    monkeypatch.setattr(_backend, "_load", lambda: (BadAdam, "", tmp_path))
    monkeypatch.setattr(_backend, "kernel_device", lambda t: True)
    res = selftest.run_kernel(next(k for k in KERNELS if k.name == "FusedAdamW"), CPU)
    assert res["ok"] is False and "step 0 tensor 0 exp_avg" in res["detail"], res["detail"]


def test_an_unwritable_cache_still_gives_verdicts(tmp_path, monkeypatch, capfd):
    _as_broken_build(monkeypatch, tmp_path)

    def refuse(path, data, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(selftest, "atomic_write", refuse)
    monkeypatch.setattr(selftest, "registry",
                        lambda: tuple(k for k in KERNELS if k.name in ("rms_norm", "swiglu")))
    try:
        assert selftest.verdict("rms_norm", CPU)[0] is False
        assert selftest.verdict("swiglu", CPU)[0] is True
    finally:
        selftest._verdicts.cache_clear()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "cannot record self-test results" in err
