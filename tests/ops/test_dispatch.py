"""Backend choice: env var and kwarg, clean errors when "cuda" is forced, silent CPU fallback."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from megalm.errors import UserError
from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, cross_entropy,
                        fused_linear_cross_entropy, layer_norm, resolve_backend, rms_norm,
                        rope_cos_sin, swiglu)
from megalm.ops import _backend, build


def _calls(backend):
    x = torch.randn(2, 3, 8)
    cos, sin = rope_cos_sin(torch.arange(3), 8)
    q = torch.randn(2, 3, 2, 8)
    labels = torch.randint(0, 8, (6,))
    return {
        "rms_norm": lambda: rms_norm(x, torch.ones(8), backend=backend),
        "layer_norm": lambda: layer_norm(x, torch.ones(8), None, backend=backend),
        "apply_rope": lambda: apply_rope(q, q, cos, sin, backend=backend)[0],
        "swiglu": lambda: swiglu(x, x, backend=backend),
        "cross_entropy": lambda: cross_entropy(x.reshape(6, 8), labels, backend=backend),
        "fused_linear_cross_entropy": lambda: fused_linear_cross_entropy(
            x.reshape(6, 8), torch.randn(8, 8), labels, backend=backend),
        "adaln_layer_norm": lambda: adaln_layer_norm(x, torch.zeros(2, 8), torch.zeros(2, 8),
                                                     backend=backend),
    }


def test_resolve_backend_kwarg_env_and_errors(monkeypatch):
    monkeypatch.delenv("MEGALM_OPS", raising=False)
    assert resolve_backend() == "auto"
    monkeypatch.setenv("MEGALM_OPS", "reference")
    assert resolve_backend() == "reference"
    assert resolve_backend("cuda") == "cuda"  # an explicit kwarg beats the env var
    monkeypatch.setenv("MEGALM_OPS", "triton")
    with pytest.raises(UserError, match="MEGALM_OPS='triton'"):
        resolve_backend()
    with pytest.raises(UserError, match="backend='fast'"):
        rms_norm(torch.randn(2, 4), None, backend="fast")


@pytest.mark.parametrize("op", list(_calls("auto")))
def test_forcing_cuda_on_cpu_raises_clear_error(op, monkeypatch):
    monkeypatch.delenv("MEGALM_OPS", raising=False)
    with pytest.raises(UserError, match="backend='cuda'.*CUDA"):
        _calls("cuda")[op]()
    monkeypatch.setenv("MEGALM_OPS", "cuda")
    with pytest.raises(UserError, match="MEGALM_OPS"):
        _calls("auto")[op]()


def test_forcing_cuda_in_the_optimizer_raises(monkeypatch):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(UserError, match="backend='cuda'"):
        FusedAdamW([p], lr=0.1, backend="cuda").step()


def test_auto_and_reference_agree_on_cpu_without_any_warning(monkeypatch, capfd):
    monkeypatch.delenv("MEGALM_OPS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU run must not warn about missing kernels
        torch.manual_seed(0)
        auto = _calls("auto")
        torch.manual_seed(0)
        ref = _calls("reference")
        for name in auto:
            torch.manual_seed(1)
            a = auto[name]()
            torch.manual_seed(1)
            torch.testing.assert_close(a, ref[name]())
    assert capfd.readouterr().err == ""


def test_fallback_warning_is_one_line_once(monkeypatch, capfd):
    _backend._warn_fallback_once.cache_clear()
    _backend._warn_fallback_once("no build for these sources")
    _backend._warn_fallback_once("no build for these sources")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "using PyTorch reference ops" in err
    _backend._warn_fallback_once.cache_clear()


def test_no_extension_on_this_machine_is_reported_not_raised():
    ext, reason, where = build.load_extension()
    assert ext is None and reason and where is None  # CPU torch or no GPU: the reason says which
    assert ("CPU-only" in reason) or ("no CUDA device" in reason)


def test_cache_key_follows_sources_python_abi_and_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "CSRC", tmp_path)
    (tmp_path / "a.cu").write_text("// one")
    k1 = build.build_key()
    (tmp_path / "a.cu").write_text("// two")
    k2 = build.build_key()
    assert k2 != k1
    assert [p.name for p in build.compiled_sources()] == ["a.cu"]
    monkeypatch.setattr(build, "EXTRA_CUDA_CFLAGS", ("-O2",))
    k3 = build.build_key()
    assert k3 != k2
    real = build.sysconfig.get_config_var
    monkeypatch.setattr(build.sysconfig, "get_config_var",
                        lambda name: "cpython-399-x86_64-linux-gnu" if name == "SOABI" else real(name))
    assert build.build_key() != k3


def test_concurrent_builds_compile_once(tmp_path, monkeypatch):
    """Ranks sharing a cache: the file lock lets one process compile; the others reuse it."""
    import multiprocessing as mp

    monkeypatch.setenv("MEGALM_OPS_CACHE", str(tmp_path))
    ctx = mp.get_context("fork")
    ready = ctx.Barrier(3, timeout=60)  # a child dying before it must not hang the others
    results = ctx.Queue()
    procs = [ctx.Process(target=_build_with_fake_compiler, args=(str(tmp_path), ready, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    outs = [results.get(timeout=10) for _ in procs]
    assert len({d for d, _ in outs}) == 1
    assert sorted(c for _, c in outs) == [0, 0, 1]  # exactly one process ran the compiler


def _build_with_fake_compiler(cache, barrier, results):
    # The real build() with torch's CPU-only check and nvcc lookup satisfied and _compile stubbed
    # by a compile that writes a complete build dir (what cpp_extension would leave).
    import json as _json

    calls = []

    def fake_compile(archs, final, cuda_home, verbose):
        calls.append(1)
        tmp = final.parent / f".tmp-{final.name}-x"
        tmp.mkdir(parents=True)
        (tmp / f"{build.EXT_NAME}.so").write_bytes(b"\0")
        (tmp / "build.json").write_text(_json.dumps({"archs": archs}))
        os.replace(tmp, final)
        return final

    build._compile = fake_compile
    import torch

    torch.version.cuda = "13.0"
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
    barrier.wait()
    d = build.build("8.0")
    results.put((str(d), len(calls)))


def test_arch_parsing():
    assert build.parse_arch("9.0;8.0") == ["8.0", "9.0"]
    assert build.arch_tag(build.parse_arch("8.0 9.0+PTX")) == "sm80-sm90ptx"
    with pytest.raises(UserError, match="--arch"):
        build.parse_arch("sm_80")
    assert build._covers({"archs": ["8.0", "9.0"]}, 9, 0)
    assert not build._covers({"archs": ["8.0"]}, 9, 0)
    assert build._covers({"archs": ["8.0+PTX"]}, 9, 0)
    # sm_80 SASS runs on sm_86/sm_89 (A10, L4, L40S); not the other way round
    assert build._covers({"archs": ["8.0"]}, 8, 6) and build._covers({"archs": ["8.0"]}, 8, 9)
    assert not build._covers({"archs": ["8.6"]}, 8, 0)
    # arch-specific targets run on their exact arch only; PTX lets newer majors JIT
    assert not build._covers({"archs": ["9.0a"]}, 9, 1) and build._covers({"archs": ["9.0a"]}, 9, 0)
    assert build._covers({"archs": ["8.0", "9.0+PTX"]}, 10, 0)
    assert not build._covers({"archs": ["8.0", "9.0"]}, 10, 0)
    assert build.parse_arch(build.DEFAULT_ARCH) == ["8.0", "9.0+PTX"]


def test_fatbin_arch_parser_reads_container_headers(tmp_path):
    import struct

    def entry(kind, arch, payload=b"x" * 24):
        # kind, version, header size, payload size; arch sits at byte 28 of the entry header
        hdr = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12
        hdr += struct.pack("<I", arch) + b"\0" * (64 - 32)
        return hdr + payload

    body = entry(2, 80) + entry(2, 90) + entry(1, 90)
    blob = b"junk" + struct.pack("<IHHQ", build.FATBIN_MAGIC, 1, 16, len(body)) + body + b"tail"
    f = tmp_path / "x.so"
    f.write_bytes(blob)
    assert build.fatbin_archs(f) == ["compute_90", "sm_80", "sm_90"]


def test_a_jit_build_is_rechecked_for_coverage(tmp_path, monkeypatch):
    """MEGALM_OPS_JIT=1 with TORCH_CUDA_ARCH_LIST naming another GPU: the fresh build must not be
    loaded on this one (it would fail at the first kernel launch)."""
    import json

    monkeypatch.setenv("MEGALM_OPS_CACHE", str(tmp_path))
    monkeypatch.setenv("MEGALM_OPS_JIT", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    built = []

    def fake_build(arch):
        d = tmp_path / "fake"
        d.mkdir()
        (d / "build.json").write_text(json.dumps({"archs": build.parse_arch(arch)}))
        built.append(arch)
        return d

    monkeypatch.setattr(build, "build", fake_build)
    ext, reason, where = build.load_extension()
    assert built == ["8.6"]
    assert ext is None and where is None and "does not cover sm_90" in reason
