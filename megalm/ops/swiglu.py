"""SwiGLU activation: silu(gate) * up, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn


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
    if use_cuda(backend, gate, up, kernel="swiglu"):
        return _SwiGLUCUDA.apply(gate, up)
    return swiglu_reference(gate, up)


def selftest_cases(device: torch.device) -> list[Case]:
    """Sizes with a scalar tail, vector-only sizes, a misaligned (offset) view, large |gate|."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((3, 1001), (4, 4096), (1, 7), (2, 3, 2816)):
            def run(dtype=dtype, shape=shape):
                ins = [randn(*shape, device=device, seed=1, scale=4), randn(*shape, device=device, seed=2)]
                compare(lambda a, b, backend: swiglu(a, b, backend=backend), ins, dtype, device,
                        f"swiglu {shape}")
            cases.append(Case(f"{dtype} {shape}", run))

        def offset(dtype=dtype):
            # Views starting one element in: the 16-byte vector path must not be taken.
            g, u = randn(1, 4097, device=device, seed=3), randn(1, 4097, device=device, seed=4)
            compare(lambda a, b, backend: swiglu(a[:, 1:], b[:, 1:], backend=backend), [g, u],
                    dtype, device, "swiglu offset view")
        cases.append(Case(f"{dtype} misaligned view", offset))
    return cases
