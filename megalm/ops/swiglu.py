"""SwiGLU activation: silu(gate) * up, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, upcast, use_cuda


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(upcast(gate)) * upcast(up)).to(gate.dtype)


class _SwiGLUCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(g, u)
        return extension().swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = extension().swiglu_bwd(dy.contiguous(), g, u)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up; gate and up share shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} vs up {tuple(up.shape)} "
                         f"{up.dtype}: expected the same shape and dtype")
    if use_cuda(backend, gate, up):
        return _SwiGLUCUDA.apply(gate, up)
    return swiglu_reference(gate, up)
