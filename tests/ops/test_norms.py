"""RMSNorm, LayerNorm and adaLN references against naive formulas, in several dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import adaln_layer_norm, layer_norm, rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def naive_rms(x, w, eps):
    x64 = x.double()
    y = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return y * w.double() if w is not None else y


def naive_ln(x, w, b, eps):
    x64 = x.double()
    mu = x64.mean(-1, keepdim=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdim=True)
    y = (x64 - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_naive(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g) * 3 + 1).to(dtype)
    w = torch.randn(64, generator=g)  # fp32 weight with low-precision activations
    y = rms_norm(x, w, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), naive_rms(x, w, 1e-5), atol=tol(dtype) * 4, rtol=tol(dtype))
    # no weight
    torch.testing.assert_close(rms_norm(x, None).double(), naive_rms(x, None, 1e-5),
                               atol=tol(dtype) * 4, rtol=tol(dtype))


def test_rms_norm_accumulates_in_fp32():
    # 4096 bf16 values of 1000: a bf16 running sum of squares would saturate its mantissa.
    x = torch.full((2, 4096), 1000.0, dtype=torch.bfloat16)
    y = rms_norm(x, torch.ones(4096))
    assert torch.all(y == 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_naive(dtype, affine):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 7, 48, generator=g) * 2 + 5).to(dtype)
    w = torch.randn(48, generator=g) if affine != "none" else None
    b = torch.randn(48, generator=g) if affine == "both" else None
    y = layer_norm(x, w, b, eps=1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), naive_ln(x, w, b, 1e-5), atol=tol(dtype) * 4, rtol=tol(dtype))


def test_norm_grads_match_float64_autograd_of_naive():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 12, generator=g, dtype=torch.float64)
    for ours, naive, params in [
        (lambda: rms_norm(x, w), lambda: naive_rms(x, w, 1e-5), (x, w)),
        (lambda: layer_norm(x, w, b), lambda: naive_ln(x, w, b, 1e-5), (x, w, b)),
    ]:
        got = torch.autograd.grad(ours(), params, dy)
        want = torch.autograd.grad(naive(), params, dy)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x_, w_: rms_norm(x_, w_), (x, w))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: layer_norm(x_, w_, b_), (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_matches_naive(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 32, generator=g).to(dtype)
    shift = torch.randn(2, 32, generator=g).to(dtype)
    scale = torch.randn(2, 32, generator=g).to(dtype)
    y = adaln_layer_norm(x, shift, scale, eps=1e-6)
    want = naive_ln(x, None, None, 1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want, atol=tol(dtype) * 8, rtol=tol(dtype))


def test_adaln_grads_incl_shift_and_scale():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(adaln_layer_norm(x, shift, scale), (x, shift, scale), dy)
    # Closed forms for the modulation grads: sums over tokens of dy and dy * norm(x).
    xhat = F.layer_norm(x.detach(), (8,), eps=1e-6)
    torch.testing.assert_close(got[1], dy.sum(1))
    torch.testing.assert_close(got[2], (dy * xhat).sum(1))
    want_dx = torch.autograd.grad(
        naive_ln(x, None, None, 1e-6) * (1 + scale[:, None]) + shift[:, None], x, dy)[0]
    torch.testing.assert_close(got[0], want_dx)
    assert torch.autograd.gradcheck(lambda *a: adaln_layer_norm(*a), (x, shift, scale))


def test_adaln_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shift/scale"):
        adaln_layer_norm(torch.randn(2, 3, 8), torch.randn(2, 4), torch.randn(2, 4))
