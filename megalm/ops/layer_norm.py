"""LayerNorm over the last dim with optional weight/bias, fp32 accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, kernel_affine, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    w = upcast(weight) if weight is not None else None
    b = upcast(bias) if bias is not None else None
    return F.layer_norm(upcast(x), (x.shape[-1],), w, b, eps).to(x.dtype)


class _LayerNormCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        w, b = kernel_affine(x2, weight, bias)
        y, mean, rstd = extension().layer_norm_fwd(x2, w, b, eps)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.shape, ctx.has_bias = shape, bias is not None
        ctx.w_dtype = weight.dtype if weight is not None else None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        # dw, db arrive in the kernel weight's dtype: no cast when that is the params' own
        dx, dw, db = extension().layer_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, w,
                                                mean, rstd, ctx.has_bias)
        dw = dw.to(ctx.w_dtype) if w is not None else None
        db = db.to(ctx.b_dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim; output dtype = x.dtype."""
    if use_cuda(backend, x, weight, bias, kernel="layer_norm"):
        return _LayerNormCUDA.apply(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def selftest_cases(device: torch.device) -> list[Case]:
    """Odd and vector widths, rows longer than a block, every affine combination, big mean."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, affine in (((3, 77), "both"), ((2, 5, 1536), "weight"), ((3, 9001), "both"),
                              ((2, 16392), "none"), ((600, 64), "bias")):
            def run(dtype=dtype, shape=shape, affine=affine):
                c = shape[-1]
                x = randn(*shape, device=device, seed=1, scale=3, shift=4)
                w = randn(c, device=device, seed=2) if affine in ("both", "weight") else None
                b = randn(c, device=device, seed=3) if affine in ("both", "bias") else None
                ins = [x] + [t for t in (w, b) if t is not None]

                def fn(a, *wb, backend):
                    it = iter(wb)
                    return layer_norm(a, next(it) if w is not None else None,
                                      next(it) if b is not None else None, 1e-5, backend=backend)

                compare(fn, ins, dtype, device, f"layer_norm {shape} {affine}")
            cases.append(Case(f"{dtype} {shape} affine={affine}", run))
    return cases
