"""The autograd Functions around the kernels, exercised on CPU against a torch model of the
binding contract (megalm/ops/csrc/ops.h + bindings.cpp): argument dtypes/shapes the Python side
passes, what it saves for backward, and how many grads it returns. The kernels themselves are
checked against the same contract on a GPU in gpu_tests/test_ops_cuda.py."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, cross_entropy,
                        fused_linear_cross_entropy, layer_norm, rms_norm, rope_cos_sin, swiglu)
from megalm.ops.doc_attention import document_attention, starts_of_lengths

MODULES = ["rms_norm", "layer_norm", "rope", "swiglu", "cross_entropy",
           "fused_linear_cross_entropy", "adaln", "adamw", "newton_schulz", "doc_attention"]


def _f32(t, name):
    if t is not None:
        assert t.dtype == torch.float32 and t.is_contiguous(), f"{name} must be contiguous fp32"


def _rows(x):
    assert x.dim() == 2 and x.is_contiguous(), "x must be contiguous [R, C]"


def _affine(x, *params):
    """Norm params: contiguous, one dtype, fp32 or x's own (host.cpp affine_type); the grads come
    back in it. A bf16 model's weights must arrive uncast (no cast kernel per call)."""
    dtypes = {p.dtype for p in params if p is not None}
    assert len(dtypes) <= 1 and dtypes <= {torch.float32, x.dtype}, dtypes
    assert all(p is None or p.is_contiguous() for p in params)
    return dtypes.pop() if dtypes else torch.float32


def _f(t):
    return t.float() if t is not None else None


class ContractModel:
    """Each entry point of the extension, in torch, with the bindings' argument checks."""

    @staticmethod
    def rms_norm_fwd(x, w, eps):
        _rows(x), _affine(x, w)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
        y = x.float() * rstd[:, None] * (_f(w) if w is not None else 1.0)
        return y.to(x.dtype), rstd

    @staticmethod
    def rms_norm_bwd(dy, x, w, rstd):
        _rows(x), _f32(rstd, "rstd")
        wt = _affine(x, w)
        assert dy.shape == x.shape and dy.dtype == x.dtype and dy.is_contiguous()
        xh = x.float() * rstd[:, None]
        wdy = dy.float() * (_f(w) if w is not None else 1.0)
        dx = rstd[:, None] * (wdy - xh * (wdy * xh).mean(-1, keepdim=True))
        dw = (dy.float() * xh).sum(0).to(wt) if w is not None else None
        return dx.to(x.dtype), dw

    @staticmethod
    def _ln(x, w, b, eps, per_batch=None):
        mean = x.float().mean(-1)
        rstd = torch.rsqrt(((x.float() - mean[:, None]) ** 2).mean(-1) + eps)
        xh = (x.float() - mean[:, None]) * rstd[:, None]
        return xh, mean, rstd

    @staticmethod
    def layer_norm_fwd(x, w, b, eps):
        _rows(x), _affine(x, w, b)
        xh, mean, rstd = ContractModel._ln(x, w, b, eps)
        y = xh * (_f(w) if w is not None else 1.0) + (_f(b) if b is not None else 0.0)
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def _ln_bwd(dy, x, gamma, mean, rstd):
        xh = (x.float() - mean[:, None]) * rstd[:, None]
        gy = dy.float() * gamma
        dx = rstd[:, None] * (gy - gy.mean(-1, keepdim=True) - xh * (gy * xh).mean(-1, keepdim=True))
        return dx.to(x.dtype), xh

    @staticmethod
    def layer_norm_bwd(dy, x, w, mean, rstd, has_bias):
        _rows(x)
        wt = _affine(x, w) if w is not None else torch.float32  # the bias's grad follows the weight's
        assert dy.shape == x.shape and dy.is_contiguous()
        dx, xh = ContractModel._ln_bwd(dy, x, _f(w) if w is not None else 1.0, mean, rstd)
        dw = (dy.float() * xh).sum(0).to(wt) if w is not None else None
        db = dy.float().sum(0).to(wt) if has_bias else None
        return dx, dw, db

    @staticmethod
    def adaln_fwd(x, shift, scale, eps):
        assert x.dim() == 3 and x.is_contiguous()
        _f32(shift, "shift"), _f32(scale, "scale")
        B, T, D = x.shape
        xh, mean, rstd = ContractModel._ln(x.reshape(-1, D), None, None, eps)
        y = xh.view(B, T, D) * (1 + scale[:, None]) + shift[:, None]
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def adaln_bwd(dy, x, scale, mean, rstd):
        _f32(scale, "scale")
        B, T, D = x.shape
        gamma = (1 + scale[:, None]).expand(B, T, D).reshape(-1, D)
        dx, xh = ContractModel._ln_bwd(dy.reshape(-1, D), x.reshape(-1, D), gamma, mean, rstd)
        d = dy.float()
        return dx.view(B, T, D), d.sum(1), (d * xh.view(B, T, D)).sum(1)

    @staticmethod
    def rope_fwd(q, k, cos, sin, inverse):
        _f32(cos, "cos"), _f32(sin, "sin")
        out = []
        for x in (q, k):
            assert x.dim() == 4 and x.is_contiguous()
            # cos/sin [1 or B, T, D/2]: a batch of 1 is broadcast by the kernel
            assert cos.shape[0] in (1, x.shape[0]) and cos.shape[1:] == (x.shape[1], x.shape[3] // 2)
            half = x.shape[-1] // 2
            c, s = cos[:, :, None], sin[:, :, None] * (-1.0 if inverse else 1.0)
            x1, x2 = x.float()[..., :half], x.float()[..., half:]
            out.append(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype))
        return tuple(out)

    @staticmethod
    def swiglu_fwd(g, u):
        assert g.is_contiguous() and u.is_contiguous() and g.dtype == u.dtype
        return (F.silu(g.float()) * u.float()).to(g.dtype)

    @staticmethod
    def swiglu_bwd(dy, g, u):
        s = torch.sigmoid(g.float())
        d = dy.float()
        return ((d * u.float() * s * (1 + g.float() * (1 - s))).to(g.dtype),
                (d * g.float() * s).to(u.dtype))

    @staticmethod
    def cross_entropy_fwd(logits, labels, ignore_index, inplace, need_grad):
        _rows(logits)
        assert labels.dtype == torch.int64 and labels.is_contiguous()
        lf = logits.float()
        valid = labels != ignore_index
        in_range = (labels >= 0) & (labels < logits.shape[1])
        safe = torch.where(valid & in_range, labels, 0)
        lse = lf.logsumexp(-1)
        loss = torch.where(valid, lse - lf.gather(1, safe[:, None])[:, 0], 0.0)
        loss = torch.where(valid & ~in_range, float("nan"), loss)  # bad label: NaN, no fault
        p = (lf - lse[:, None]).exp()
        hit = torch.nonzero(valid & in_range)[:, 0]
        p[hit, safe[hit]] -= 1
        grad = (p * valid.float()[:, None]).to(logits.dtype)  # unscaled: backward applies 1/n
        if not need_grad:
            return loss, None
        if inplace:
            logits.copy_(grad)
            grad = logits
        return loss, grad

    @staticmethod
    def scale_cast(x, factor, out):
        assert x.is_contiguous() and factor.dtype == torch.float32 and factor.numel() == 1
        assert out.shape == x.shape and (out.dtype == x.dtype or x.dtype == torch.float32)
        out.copy_(x.float() * factor)

    @staticmethod
    def multi_tensor_adamw(ps, gs, ms, vs, masters, lr, b1, b2, eps, wd, bc1, bc2):
        assert len(ps) == len(gs) == len(ms) == len(vs) and len(masters) in (0, len(ps))
        for i, p in enumerate(ps):
            w = masters[i] if masters else p.float()
            g = gs[i].float()
            m, v = ms[i].float(), vs[i].float()
            assert ms[i].dtype == (torch.float32 if masters else p.dtype)
            w = w * (1 - lr * wd)
            m = m + (1 - b1) * (g - m)
            v = v * b2 + (1 - b2) * g * g
            w = w - (lr / bc1) * m / (v.sqrt() / bc2**0.5 + eps)
            ms[i].copy_(m), vs[i].copy_(v), p.copy_(w)
            if masters:
                masters[i].copy_(w)

    @staticmethod
    def newton_schulz(g, steps, a, b, c, eps):
        # host.cpp: fp32 norm of the input as given, one rounding to bf16, then per iteration
        # one GEMM for A and two GEMMs whose epilogues (addmm's beta/alpha) add the other terms.
        assert g.dim() == 2 and g.is_contiguous() and steps >= 0 and eps > 0
        x = (g.float() / (g.float().pow(2).sum().sqrt() + eps)).to(torch.bfloat16)
        tall = g.shape[0] > g.shape[1]
        x = x.t() if tall else x
        for _ in range(steps):
            m = x @ x.t()
            x = torch.addmm(x, torch.addmm(m, m, m, beta=b, alpha=c), x, beta=a, alpha=1.0)
        return x.t() if tall else x

    @staticmethod
    def _attention_args(q, k, v, starts):
        # bindings.cpp check_doc_attention: contiguous, 16-byte aligned half/bf16 [B, T, H, D].
        for t in (q, k, v):
            assert t.dim() == 4 and t.is_contiguous() and t.data_ptr() % 16 == 0
            assert t.dtype == q.dtype and t.dtype in (torch.float16, torch.bfloat16)
        assert k.shape == v.shape and q.shape[2] % k.shape[2] == 0 and q.shape[-1] in (64, 128)
        assert starts.dtype == torch.int32 and starts.shape == q.shape[:2] and starts.is_contiguous()

    @staticmethod
    def _attention(q, k, v, starts):
        from megalm.ops.doc_attention import reference

        return reference(q.float(), k.float(), v.float(), starts)

    @staticmethod
    def doc_attention_fwd(q, k, v, starts):
        ContractModel._attention_args(q, k, v, starts)
        o = ContractModel._attention(q, k, v, starts)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])  # read only by the backward
        return o.to(q.dtype), lse

    @staticmethod
    def doc_attention_bwd(dout, q, k, v, out, lse, starts):
        ContractModel._attention_args(q, k, v, starts)
        assert dout.shape == out.shape == q.shape and dout.dtype == out.dtype == q.dtype
        assert dout.is_contiguous() and dout.data_ptr() % 16 == 0
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        with torch.enable_grad():
            xs = [t.detach().float().requires_grad_() for t in (q, k, v)]
            torch.autograd.backward(ContractModel._attention(*xs, starts), dout.float())
        return tuple(x.grad.to(q.dtype) for x in xs)


@pytest.fixture
def contract_as_cuda(monkeypatch):
    for name in MODULES:
        mod = importlib.import_module(f"megalm.ops.{name}")
        if hasattr(mod, "use_cuda"):
            monkeypatch.setattr(mod, "use_cuda", lambda backend, *t, kernel=None: backend != "reference")
        if hasattr(mod, "extension"):
            monkeypatch.setattr(mod, "extension", lambda: ContractModel)
    ce = importlib.import_module("megalm.ops.cross_entropy")
    monkeypatch.setattr(ce, "extension", lambda: ContractModel)


def _both(fn, inputs):
    """(outputs, grads) of fn(*inputs) through the kernel path, then the reference path."""
    res = []
    for backend in ("auto", "reference"):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*xs, backend=backend)
        y = y if isinstance(y, tuple) else (y,)
        g = torch.Generator().manual_seed(0)
        torch.autograd.backward(y, [torch.randn(o.shape, generator=g).to(o.dtype) for o in y])
        res.append(([o.detach() for o in y], [x.grad for x in xs if x.is_floating_point()]))
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functions_match_reference_through_the_contract(contract_as_cuda, dtype):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    labels = torch.randint(0, 11, (10,), generator=g)
    labels[2] = -100
    cases = {
        "rms_norm": (lambda x, w, backend: rms_norm(x, w, backend=backend), [r(2, 5, 16), torch.randn(16)]),
        "rms_norm_noweight": (lambda x, backend: rms_norm(x, None, backend=backend), [r(3, 16)]),
        "layer_norm": (lambda x, w, b, backend: layer_norm(x, w, b, backend=backend),
                       [r(2, 5, 16), torch.randn(16), torch.randn(16)]),
        "layer_norm_bias_only": (lambda x, b, backend: layer_norm(x, None, b, backend=backend),
                                 [r(4, 16), torch.randn(16)]),
        # The model's own case: params in the activations' dtype (bf16 training), passed uncast.
        "rms_norm_model_dtype": (lambda x, w, backend: rms_norm(x, w, backend=backend), [r(2, 5, 16), r(16)]),
        "layer_norm_model_dtype": (lambda x, w, b, backend: layer_norm(x, w, b, backend=backend),
                                   [r(2, 5, 16), r(16), r(16)]),
        "adaln": (lambda x, s, c, backend: adaln_layer_norm(x, s, c, backend=backend),
                  [r(2, 5, 16), r(2, 16), r(2, 16)]),
        "rope": (lambda q, k, backend: apply_rope(q, k, cos, sin, backend=backend),
                 [r(2, 5, 4, 8), r(2, 5, 2, 8)]),
        "swiglu": (lambda a, b, backend: swiglu(a, b, backend=backend), [r(3, 7), r(3, 7)]),
        "cross_entropy": (lambda x, backend: cross_entropy(x, labels, backend=backend), [r(10, 11)]),
        "fused_linear_ce": (lambda h, w, backend: fused_linear_cross_entropy(
            h, w, labels, chunk_size=3, backend=backend), [r(10, 6), r(11, 6)]),
    }
    if dtype == torch.bfloat16:  # the attention kernel takes half/bf16 only (fp32: the reference)
        starts = starts_of_lengths([[3, 1, 6], [10]], torch.device("cpu"))
        cases["document_attention"] = (
            lambda q, k, v, backend: document_attention(q, k, v, starts, backend=backend),
            [r(2, 10, 4, 64), r(2, 10, 2, 64), r(2, 10, 2, 64)])
    for name, (fn, inputs) in cases.items():
        (yk, gk), (yr, gr) = _both(fn, inputs)
        assert len(gk) == len(gr) == len(inputs), name
        for a, b in zip(yk + gk, yr + gr):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)


def test_document_attention_hands_the_kernel_aligned_views(contract_as_cuda):
    # A view one element into its storage (as a slice of a fused QKV projection could be): the
    # Function copies it to a 16-byte boundary; the contract asserts the alignment.
    starts = starts_of_lengths([[4, 4]], torch.device("cpu"))
    flat = torch.randn(8 * 2 * 64 * 3 + 1).bfloat16()
    q, k, v = (flat[1 + i * 1024:1 + (i + 1) * 1024].view(1, 8, 2, 64).requires_grad_() for i in range(3))
    assert q.data_ptr() % 16 != 0
    document_attention(q, k, v, starts).float().sum().backward()
    assert q.grad.shape == q.shape


def test_bf16_norm_params_reach_the_kernels_uncast(contract_as_cuda, monkeypatch):
    """A bf16 model's norm weights go to the kernels as they are and their grads come back bf16: no
    cast kernel per call each way (it was 2 per LayerNorm forward and 2 per backward)."""
    seen = []
    for name in ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"):
        real = getattr(ContractModel, name)

        def spy(*args, real=real, name=name):
            seen.append((name, args[2 if name.endswith("bwd") else 1].dtype))
            return real(*args)
        monkeypatch.setattr(ContractModel, name, staticmethod(spy))
    x = torch.randn(3, 16).bfloat16().requires_grad_()
    w, b = (torch.randn(16).bfloat16().requires_grad_() for _ in range(2))
    (layer_norm(x, w, b).sum() + rms_norm(x, w).sum()).backward()
    assert sorted(seen) == sorted((n, torch.bfloat16) for n in
                                  ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"))
    assert w.grad.dtype == b.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.bfloat16, False)])
def test_adamw_kernel_path_matches_reference(contract_as_cuda, dtype, master):
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=g) for s in [(5, 3), (7,)]]
    out = {}
    for backend in ("auto", "reference"):
        ps = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
        opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, master_weights=master, backend=backend)
        gg = torch.Generator().manual_seed(3)
        for step in range(3):
            for i, p in enumerate(ps):
                if step == 1 and i == 1:
                    p.grad = None  # a param skipping a step ends up at a different step count
                else:
                    p.grad = torch.randn(p.shape, generator=gg).to(dtype)
            opt.step()
        out[backend] = (ps, opt)
    for pk, pr in zip(out["auto"][0], out["reference"][0]):
        sk, sr = out["auto"][1].state[pk], out["reference"][1].state[pr]
        assert sk["step"].item() == sr["step"].item()
        # bf16 without master: the kernel rounds once, torch's per-op bf16 math at every op
        tol = 2e-2 if (dtype == torch.bfloat16 and not master) else 1e-6
        torch.testing.assert_close(pk.float(), pr.float(), atol=tol, rtol=tol)
        assert ("master" in sk) == ("master" in sr) == (master and dtype != torch.float32)


def test_newton_schulz_kernel_path_matches_reference(contract_as_cuda):
    from megalm.ops import newton_schulz, newton_schulz_reference
    from megalm.ops.selftest import assert_as_good_as_eager

    g = torch.Generator().manual_seed(4)
    for shape in [(12, 40), (40, 12), (16, 16), (2, 8, 24)]:
        x = torch.randn(shape, generator=g)
        k, r = newton_schulz(x, backend="auto"), newton_schulz(x, backend="reference")
        assert k.dtype == r.dtype == torch.bfloat16 and k.shape == r.shape == x.shape, shape
        # bf16 through 5 iterations differs by ~2e-2 between any two roundings; the rule: no
        # further from the float64 iteration than the reference is.
        assert_as_good_as_eager(k, r, newton_schulz_reference(x.double()), torch.bfloat16, str(shape))
