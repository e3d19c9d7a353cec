"""RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * weight, fp32 accumulation."""

from __future__ import annotations

import torch

from megalm.ops._backend import extension, kernel_affine, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * upcast(weight)
    return y.to(x.dtype)


class _RMSNormCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        (w,) = kernel_affine(x2, weight)
        y, rstd = extension().rms_norm_fwd(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.w_dtype = shape, (weight.dtype if weight is not None else None)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = extension().rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view(ctx.shape), (dw.to(ctx.w_dtype) if weight is not None else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim; output dtype = x.dtype; weight may be fp32 with bf16 x."""
    if use_cuda(backend, x, weight, kernel="rms_norm"):
        return _RMSNormCUDA.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def selftest_cases(device: torch.device) -> list[Case]:
    """Odd widths (scalar path), 16-byte-vector widths, rows longer than a block, no weight."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, with_w in (((3, 77), True), ((2, 5, 1024), True), ((3, 9001), True),
                              ((2, 16392), False), ((600, 64), True)):
            def run(dtype=dtype, shape=shape, with_w=with_w):
                x = randn(*shape, device=device, seed=1, scale=2, shift=0.5)
                ins = [x, randn(shape[-1], device=device, seed=2)] if with_w else [x]
                compare(lambda a, *w, backend: rms_norm(a, w[0] if w else None, 1e-5, backend=backend),
                        ins, dtype, device, f"rms_norm {shape}")
            cases.append(Case(f"{dtype} {shape} weight={with_w}", run))
    return cases
