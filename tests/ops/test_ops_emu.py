"""The cross-entropy, SwiGLU, RoPE, scale, AdamW and Newton-Schulz-prologue kernels' own sources run
on the CPU through the CUDA emulation (csrc/emu/cuda_emu.h; see test_doc_attention_emu.py), against
their references with the self-test's accuracy rule: vector and scalar paths, ignored and
out-of-range labels, grouped RoPE heads with per-sample tables, the inverse rotation, AdamW over
several tensors and chunks with and without fp32 masters, the last-block norm over many blocks."""

from __future__ import annotations

import ctypes

import pytest
import torch

from megalm.ops.cross_entropy import ce_rows_reference
from megalm.ops.rope import apply_rope_reference, rope_cos_sin
from megalm.ops.selftest import assert_as_good_as_eager
from megalm.ops.swiglu import swiglu_reference
from tests.ops.emu import build, check, nan_like, ptr, reversed_order

I64 = ctypes.c_int64
CODE = {torch.float32: 0, torch.bfloat16: 1}
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    return build("ops_emu", tmp_path_factory.mktemp("emu"),
                 ("cross_entropy", "swiglu", "rope", "scale", "adamw", "newton_schulz"))


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _rule(got, eager, oracle, dtype, what):
    assert_as_good_as_eager(got, eager.to(got.dtype), oracle, dtype, what)


@pytest.mark.parametrize("reverse", [False, True], ids=["lanes_up", "lanes_down"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", [(6, 20000), (5, 1001), (3, 77)])
def test_cross_entropy_rows(emu, dtype, n, v, reverse):
    # Unit-scale logits: every element's share of the softmax matters to the loss.
    x = _randn(n, v, seed=v).to(dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    labels[1] = -100  # ignored: loss 0, grad 0
    loss, grad = torch.full((n,), float("nan")), nan_like(x)
    with reversed_order(emu, reverse):
        check(emu, emu.megalm_emu_cross_entropy_fwd(CODE[dtype], ptr(x), ptr(labels), ptr(grad), ptr(loss),
                                                    I64(n), I64(v), I64(-100)))
    want_loss, want_grad = ce_rows_reference(x.double(), labels, -100)
    eager_loss, eager_grad = ce_rows_reference(x, labels, -100)
    _rule(loss, eager_loss, want_loss, torch.float32, "ce loss")  # the loss is fp32 in every dtype
    _rule(grad, eager_grad, want_grad, dtype, "ce grad")
    # In place and loss only (the fused LM head's and evaluation's calls).
    inplace, loss2 = x.clone(), torch.empty(n)
    check(emu, emu.megalm_emu_cross_entropy_fwd(CODE[dtype], ptr(inplace), ptr(labels), ptr(inplace), ptr(loss2),
                                                I64(n), I64(v), I64(-100)))
    assert torch.equal(inplace, grad) and torch.equal(loss2, loss)
    loss3 = torch.empty(n)
    check(emu, emu.megalm_emu_cross_entropy_fwd(CODE[dtype], ptr(x), ptr(labels), None, ptr(loss3), I64(n), I64(v),
                                                I64(-100)))
    assert torch.equal(loss3, loss)


def test_cross_entropy_out_of_range_label_is_nan_not_a_fault(emu):
    x = _randn(2, 64, seed=3).float()
    labels = torch.tensor([5, 64 + 9])
    loss, grad = torch.full((2,), float("nan")), nan_like(x)
    check(emu, emu.megalm_emu_cross_entropy_fwd(0, ptr(x), ptr(labels), ptr(grad), ptr(loss), I64(2), I64(64),
                                                I64(-100)))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [4096 * 3, 1001])
def test_swiglu(emu, dtype, n):
    gate, up, dy = (_randn(n, seed=s, scale=3).to(dtype) for s in (1, 2, 3))
    y, dgate, dup = nan_like(gate), nan_like(gate), nan_like(gate)
    check(emu, emu.megalm_emu_swiglu_fwd(CODE[dtype], ptr(gate), ptr(up), ptr(y), I64(n)))
    check(emu, emu.megalm_emu_swiglu_bwd(CODE[dtype], ptr(dy), ptr(gate), ptr(up), ptr(dgate), ptr(dup), I64(n)))
    runs = []
    for cast in (lambda t: t, torch.Tensor.double):
        g, u = (cast(t).detach().requires_grad_() for t in (gate, up))
        out = swiglu_reference(g, u)
        out.backward(cast(dy))
        runs.append((out.detach(), g.grad, u.grad))
    for name, got, eager, oracle in zip(("y", "dgate", "dup"), (y, dgate, dup), *runs):
        _rule(got, eager, oracle, dtype, f"swiglu {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [False, True], ids=["shared_table", "per_sample_table"])
def test_rope_forward_and_inverse(emu, dtype, batched):
    B, T, hq, hk, D = 2, 7, 4, 2, 64
    q, k = _randn(B, T, hq, D, seed=4).to(dtype), _randn(B, T, hk, D, seed=5).to(dtype)
    pos = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [3]]) if batched else torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, D)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    for inverse in (0, 1):
        qo, ko = nan_like(q), nan_like(k)
        check(emu, emu.megalm_emu_rope(CODE[dtype], ptr(q), ptr(k), ptr(qo), ptr(ko), ptr(cos), ptr(sin), I64(B),
                                       I64(T), I64(hq), I64(hk), I64(D), int(batched), inverse))
        sgn = -1.0 if inverse else 1.0
        want = apply_rope_reference(q.double(), k.double(), cos.double(), sgn * sin.double())
        eager = apply_rope_reference(q, k, cos, sgn * sin)
        _rule(qo, eager[0], want[0], dtype, f"rope q inverse={inverse}")
        _rule(ko, eager[1], want[1], dtype, f"rope k inverse={inverse}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [8 * 1000, 999])
def test_scale_to_bf16(emu, x_dtype, n):
    x = _randn(n, seed=6, scale=100).to(x_dtype)
    factor = torch.tensor([1 / 3.0])
    y = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    check(emu, emu.megalm_emu_scale_to_bf16(int(x_dtype == torch.float32), ptr(x), ptr(factor), ptr(y), I64(n)))
    # One rounding, of the fp32 product: exactly what torch gives for the same computation.
    assert torch.equal(y, (x.float() * factor).to(torch.bfloat16))


def _adam_reference(w, g, m, v, lr, b1, b2, eps, wd, step):
    """torch.optim.AdamW's update in fp64 (decoupled decay first)."""
    w, g, m, v = (t.double() for t in (w, g, m, v))
    w = w * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    return w - lr / bc1 * m / (v.sqrt() / bc2 ** 0.5 + eps), m, v


@pytest.mark.parametrize("reverse", [False, True], ids=["lanes_up", "lanes_down"])
@pytest.mark.parametrize("mode", ["fp32", "bf16_master", "bf16"])
def test_adamw_multi_tensor(emu, mode, reverse):
    # Two chunks and a tail, a tensor one element off 16 bytes (scalar path), a tiny one.
    numels = [2 * 65536 + 37, 1001, 3]
    dt = torch.float32 if mode == "fp32" else torch.bfloat16
    sdt = torch.bfloat16 if mode == "bf16" else torch.float32
    g_ = torch.Generator().manual_seed(9)
    masters = [torch.randn(n, generator=g_) for n in numels]
    params = [w.to(dt) for w in masters]
    params[1] = torch.cat([torch.zeros(1, dtype=dt), params[1]])[1:]  # misaligned view
    grads = [torch.randn(n, generator=g_).to(dt) for n in numels]
    ms = [torch.randn(n, generator=g_).mul(0.1).to(sdt) for n in numels]
    vs = [torch.rand(n, generator=g_).mul(0.01).to(sdt) for n in numels]
    before = [(w.clone(), g.clone(), m.clone(), v.clone()) for w, g, m, v in
              zip(masters if mode == "bf16_master" else params, grads, ms, vs)]
    lr, b1, b2, eps, wd, step = 0.1, 0.9, 0.95, 1e-8, 0.1, 3
    arr = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
    mst = (ctypes.POINTER(ctypes.c_float) * 3)(*[ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))
                                                  for t in masters]) if mode == "bf16_master" else None
    F = ctypes.c_float
    with reversed_order(emu, reverse):
        check(emu, emu.megalm_emu_adamw(CODE[dt], 3, arr(params), arr(grads), arr(ms), arr(vs), mst,
                                        (ctypes.c_int64 * 3)(*numels), F(lr), F(b1), F(b2), F(eps), F(wd),
                                        F(1 - b1 ** step), F((1 - b2 ** step) ** 0.5)))
    for i, (w0, g0, m0, v0) in enumerate(before):
        w, m, v = _adam_reference(w0, g0, m0, v0, lr, b1, b2, eps, wd, step)
        tol = dict(rtol=1e-5, atol=1e-6) if sdt == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(ms[i].double(), m, **tol)
        torch.testing.assert_close(vs[i].double(), v, **tol)
        if mode == "bf16_master":
            torch.testing.assert_close(masters[i].double(), w, rtol=1e-5, atol=1e-6)
            assert torch.equal(params[i], masters[i].to(torch.bfloat16))  # the param is its master, rounded
        else:
            torch.testing.assert_close(params[i].double(), w, **(tol if dt == torch.float32 else
                                                                 dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [256 * 8 * 1024 * 2 + 5, 77])
def test_inverse_frobenius_norm_over_many_blocks(emu, dtype, n):
    x = _randn(n, seed=10).to(dtype)
    buf = torch.zeros(2)
    check(emu, emu.megalm_emu_inverse_frobenius_norm(CODE[dtype], ptr(x), ptr(buf), ctypes.c_float(1e-7), I64(n)))
    want = 1 / (x.double().pow(2).sum().sqrt() + 1e-7)
    torch.testing.assert_close(buf[0].double(), want, rtol=1e-5, atol=0)
