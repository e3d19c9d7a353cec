"""RoPE (rotate_half layout) and SwiGLU references against independent formulations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import apply_rope, rope_cos_sin, swiglu


def naive_rope_complex(x, positions, theta):
    """Oracle via complex multiplication: pair (x[i], x[i + D/2]) is rotated by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            pos = float(positions[b if positions.dim() == 2 else 0, t] if positions.dim() == 2
                        else positions[t])
            for i in range(half):
                ang = pos * theta ** (-2.0 * i / d)
                z = torch.complex(x[b, t, :, i].double(), x[b, t, :, half + i].double())
                r = z * complex(math.cos(ang), math.sin(ang))
                out[b, t, :, i], out[b, t, :, half + i] = r.real, r.imag
    return out


def test_rope_cos_sin_shapes_and_values():
    cos, sin = rope_cos_sin(torch.arange(5), 8, theta=100.0, dtype=torch.bfloat16)
    assert cos.shape == sin.shape == (1, 5, 4) and cos.dtype == torch.bfloat16
    pos = torch.tensor([[0, 1, 2], [7, 0, 1]])
    cos, sin = rope_cos_sin(pos, 8, theta=100.0)
    assert cos.shape == (2, 3, 4)
    assert math.isclose(float(cos[1, 0, 1]), math.cos(7 * 100.0 ** (-2 / 8)), rel_tol=1e-6)
    assert math.isclose(float(sin[1, 0, 3]), math.sin(7 * 100.0 ** (-6 / 8)), rel_tol=1e-6)
    with pytest.raises(ValueError):
        rope_cos_sin(torch.arange(3), 7)


@pytest.mark.parametrize("per_batch_positions", [False, True])
def test_apply_rope_matches_complex_oracle(per_batch_positions):
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hk, D = 2, 5, 4, 2, 8  # grouped-query shapes: k has fewer heads
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hk, D, generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]]) if per_batch_positions else torch.arange(T)
    cos, sin = rope_cos_sin(pos, D, theta=500.0)
    qo, ko = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(qo.double(), naive_rope_complex(q, pos, 500.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), naive_rope_complex(k, pos, 500.0), atol=1e-5, rtol=1e-5)


def test_apply_rope_dtype_and_grad():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(3), 4)
    qo, ko = apply_rope(q, q, cos, sin)
    assert qo.dtype == torch.bfloat16
    q64 = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k64 = torch.randn(1, 3, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c64, s64 = rope_cos_sin(torch.arange(3), 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, c64, s64), (q64, k64))
    # the rotation is orthogonal: norms are preserved, position 0 is the identity
    qo, _ = apply_rope(q64, k64, c64, s64)
    torch.testing.assert_close(qo.norm(dim=-1), q64.norm(dim=-1))
    torch.testing.assert_close(qo[:, 0], q64[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_matches_naive(dtype):
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(4, 33, generator=g) * 4).to(dtype)
    up = torch.randn(4, 33, generator=g).to(dtype)
    y = swiglu(gate, up)
    g64 = gate.double()
    want = g64 / (1 + torch.exp(-g64)) * up.double()
    assert y.dtype == dtype
    atol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=atol)


def test_swiglu_grads():
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: swiglu(a, b), (gate, up))
    dy = torch.randn(3, 10, generator=g, dtype=torch.float64)
    dg, du = torch.autograd.grad(swiglu(gate, up), (gate, up), dy)
    s = torch.sigmoid(gate.detach())
    torch.testing.assert_close(dg, dy * up.detach() * s * (1 + gate.detach() * (1 - s)))
    torch.testing.assert_close(du, dy * F.silu(gate.detach()))
    with pytest.raises(ValueError):
        swiglu(gate, up[:, :5])
