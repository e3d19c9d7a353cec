"""adaLN modulation fused with LayerNorm: layer_norm(x, no affine) * (1 + scale) + shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn


def adaln_layer_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float = 1e-6) -> torch.Tensor:
    xf = F.layer_norm(upcast(x), (x.shape[-1],), None, None, eps)
    y = xf * (1 + upcast(scale)[:, None]) + upcast(shift)[:, None]
    return y.to(x.dtype)


class _AdaLNCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        scale32 = scale.float().contiguous()  # kernels take fp32 modulation params
        y, mean, rstd = extension().adaln_fwd(x, shift.float().contiguous(), scale32, eps)
        ctx.save_for_backward(x, scale32, mean, rstd)
        ctx.shift_dtype, ctx.scale_dtype = shift.dtype, scale.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = extension().adaln_bwd(dy.contiguous(), x, scale, mean, rstd)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(ctx.scale_dtype), None


def adaln_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                     backend: str = "auto") -> torch.Tensor:
    """x [B,T,D], shift/scale [B,D] -> [B,T,D] in x.dtype."""
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(f"adaln_layer_norm: x {tuple(x.shape)}, shift {tuple(shift.shape)}, scale "
                         f"{tuple(scale.shape)}: expected x [B,T,D] and shift/scale [B,D]")
    if use_cuda(backend, x, shift, scale, kernel="adaln_layer_norm"):
        return _AdaLNCUDA.apply(x.contiguous(), shift, scale, eps)
    return adaln_layer_norm_reference(x, shift, scale, eps)


def selftest_cases(device: torch.device) -> list[Case]:
    """Per-batch modulation with odd and vector widths, rows longer than a block, many rows."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((2, 37, 200), (3, 5, 9001), (2, 300, 64), (1, 4, 77)):
            def run(dtype=dtype, shape=shape):
                b, _, d = shape
                ins = [randn(*shape, device=device, seed=1, scale=2),
                       randn(b, d, device=device, seed=2), randn(b, d, device=device, seed=3)]
                compare(lambda a, s, c, backend: adaln_layer_norm(a, s, c, 1e-6, backend=backend),
                        ins, dtype, device, f"adaln {shape}")
            cases.append(Case(f"{dtype} {shape}", run))
    return cases
