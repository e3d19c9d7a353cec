"""LayerNorm over the last dim with optional weight/bias, fp32 accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, upcast, use_cuda


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
        f32 = lambda t: t.float().contiguous() if t is not None else None  # noqa: E731
        w32, b32 = f32(weight), f32(bias)  # kernels take fp32 affine params
        y, mean, rstd = extension().layer_norm_fwd(x2, w32, b32, eps)
        ctx.save_for_backward(x2, w32, mean, rstd)
        ctx.shape, ctx.has_bias = shape, bias is not None
        ctx.w_dtype = weight.dtype if weight is not None else None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w32, mean, rstd = ctx.saved_tensors
        dx, dw, db = extension().layer_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, w32,
                                                mean, rstd, ctx.has_bias)
        dw = dw.to(ctx.w_dtype) if w32 is not None else None
        db = db.to(ctx.b_dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim; output dtype = x.dtype."""
    if use_cuda(backend, x, weight, bias):
        return _LayerNormCUDA.apply(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
