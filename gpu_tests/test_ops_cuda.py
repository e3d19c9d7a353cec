"""CUDA kernels vs the references: error against a float64 oracle must stay within 2x the error
of PyTorch eager (our reference ops) in the same dtype. Run with `make test-gpu`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, cross_entropy,
                        fused_linear_cross_entropy, layer_norm, rms_norm, rope_cos_sin, swiglu)
from megalm.ops import _backend

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute floor (relative to the oracle's magnitude): summation order alone moves fp32 results.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def extension_built():
    ext = _backend.extension()
    assert ext is not None, f"extension not loaded: {_backend.unavailable_reason()}"


def _err(a, oracle):
    return (a.double() - oracle).abs().max().item()


def assert_as_good_as_eager(kernel, eager, oracle, dtype, what):
    assert kernel.dtype == eager.dtype, what
    assert torch.isfinite(kernel).all(), what
    ek, ee = _err(kernel, oracle), _err(eager, oracle)
    floor = FLOOR[dtype] * max(1.0, oracle.abs().max().item())
    assert ek <= 2 * ee + floor, f"{what}: kernel err {ek:.3e} vs eager {ee:.3e} ({dtype})"


def run_three(fn, inputs, dtype, grad_out_seed=0):
    """fn(*tensors, backend) on: kernel in dtype, reference in dtype, reference in fp64."""
    outs = {}
    for mode, dt, backend in [("kernel", dtype, "cuda"), ("eager", dtype, "reference"),
                              ("oracle", torch.float64, "reference")]:
        xs = [t.detach().to(dt if t.is_floating_point() else t.dtype).requires_grad_(t.is_floating_point())
              for t in inputs]
        y = fn(*xs, backend=backend)
        y = y if isinstance(y, tuple) else (y,)
        g = torch.Generator(device=DEV).manual_seed(grad_out_seed)
        dys = [torch.randn(o.shape, generator=g, device=DEV, dtype=torch.float64).to(o.dtype) for o in y]
        torch.autograd.backward(y, dys)
        outs[mode] = ([o.detach() for o in y], [x.grad for x in xs if x.grad is not None])
    return outs


def compare(outs, dtype, name):
    for kind in (0, 1):
        for i, (k, e, o) in enumerate(zip(outs["kernel"][kind], outs["eager"][kind], outs["oracle"][kind])):
            assert_as_good_as_eager(k, e, o, dtype, f"{name} {'out' if kind == 0 else 'grad'}[{i}]")


def _randn(*shape, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float64) * scale + shift


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 333, 1024), (2, 3, 4096), (1, 5, 77)])
def test_rms_norm(dtype, shape):
    x, w = _randn(*shape, scale=2, shift=0.5), _randn(shape[-1], seed=1)
    compare(run_three(lambda a, b, backend: rms_norm(a, b, 1e-5, backend=backend), [x, w], dtype),
            dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm(dtype, affine):
    x = _randn(3, 257, 1536, scale=3, shift=4)
    args = [x] + ([_randn(1536, seed=1)] if affine != "none" else []) + \
        ([_randn(1536, seed=2)] if affine == "both" else [])

    def fn(a, *wb, backend):
        w = wb[0] if wb else None
        b = wb[1] if len(wb) > 1 else None
        return layer_norm(a, w, b, 1e-5, backend=backend)

    compare(run_three(fn, args, dtype), dtype, f"layer_norm[{affine}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln(dtype):
    x, shift, scale = _randn(3, 300, 768, scale=2), _randn(3, 768, seed=1), _randn(3, 768, seed=2)
    compare(run_three(lambda a, b, c, backend: adaln_layer_norm(a, b, c, 1e-6, backend=backend),
                      [x, shift, scale], dtype), dtype, "adaln")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype):
    B, T, Hq, Hk, D = 2, 96, 8, 2, 128
    q, k = _randn(B, T, Hq, D), _randn(B, T, Hk, D, seed=1)
    pos = torch.stack([torch.arange(T), torch.arange(T) % 37]).to(DEV)

    def fn(a, b, backend):
        cos, sin = rope_cos_sin(pos, D, 10000.0, dtype=torch.promote_types(a.dtype, torch.float32))
        return apply_rope(a, b, cos, sin, backend=backend)

    compare(run_three(fn, [q, k], dtype), dtype, "rope")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    g, u = _randn(4, 100, 2816, scale=3), _randn(4, 100, 2816, seed=1)
    compare(run_three(lambda a, b, backend: swiglu(a, b, backend=backend), [g, u], dtype), dtype,
            "swiglu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 50257])
def test_cross_entropy(dtype, vocab):
    logits = _randn(300, vocab, scale=4)
    labels = torch.randint(0, vocab, (300,), device=DEV)
    labels[::7] = -100
    compare(run_three(lambda a, backend: cross_entropy(a, labels, backend=backend), [logits], dtype),
            dtype, "cross_entropy")


def test_cross_entropy_matches_torch_exactly_enough_and_all_ignored():
    logits = _randn(64, 1000, scale=3).float().requires_grad_(True)
    labels = torch.randint(0, 1000, (64,), device=DEV)
    loss = cross_entropy(logits, labels, backend="cuda")
    loss.backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(loss, F.cross_entropy(ref.detach(), labels))
    torch.testing.assert_close(logits.grad, ref.grad)
    lg = _randn(4, 10).float().requires_grad_(True)
    z = cross_entropy(lg, torch.full((4,), -100, device=DEV), backend="cuda")
    z.backward()
    assert z.item() == 0.0 and torch.all(lg.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy(dtype):
    h, w = _randn(1000, 512), _randn(32000, 512, scale=0.05, seed=1)
    labels = torch.randint(0, 32000, (1000,), device=DEV)
    labels[:50] = -100

    def fn(a, b, backend):
        return fused_linear_cross_entropy(a, b, labels, chunk_size=256, backend=backend)

    outs = run_three(fn, [h, w], dtype)
    compare(outs, dtype, "fused_linear_ce")


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.bfloat16, False), (torch.float16, True)])
def test_adamw_kernel_matches_reference(dtype, master):
    sizes = [(65536 * 3 + 5,), (17, 33), (1,), (4096, 64)]
    g = torch.Generator(device=DEV).manual_seed(0)
    init = [torch.randn(s, generator=g, device=DEV) for s in sizes]
    runs = {}
    for backend in ("cuda", "reference"):
        ps = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
        opt = FusedAdamW(ps, lr=1e-3, weight_decay=0.1, master_weights=master, backend=backend)
        gg = torch.Generator(device=DEV).manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg, device=DEV).to(dtype)
            opt.step()
        runs[backend] = (ps, opt)
    for pk, pr in zip(runs["cuda"][0], runs["reference"][0]):
        if master:
            mk, mr = runs["cuda"][1].state[pk]["master"], runs["reference"][1].state[pr]["master"]
            torch.testing.assert_close(mk, mr, atol=1e-6, rtol=1e-5)
        # fp32: same math; low precision: the kernel rounds once where torch rounds per op, and
        # masters that differ in the last fp32 bit may round to neighbouring bf16/fp16 values
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(pk.detach().float(), pr.detach().float(), atol=tol, rtol=tol)


def test_auto_backend_uses_the_kernel(monkeypatch):
    import importlib

    mod = importlib.import_module("megalm.ops.rms_norm")

    def no_reference(*a, **k):
        raise AssertionError("auto picked the reference on CUDA tensors")

    monkeypatch.delenv("MEGALM_OPS", raising=False)
    monkeypatch.setattr(mod, "rms_norm_reference", no_reference)
    x = _randn(8, 64).bfloat16()
    w = torch.ones(64, device=DEV)
    assert torch.equal(rms_norm(x, w), rms_norm(x, w, backend="cuda"))
