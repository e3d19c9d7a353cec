"""Rotary position embedding, "rotate_half" layout (GPT-NeoX / HF Llama).

x1 = x[..., :D/2], x2 = x[..., D/2:];  out = [x1*cos - x2*sin, x2*cos + x1*sin].
"""

from __future__ import annotations

import torch

from megalm.ops._backend import extension, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin each [B or 1, T, head_dim // 2], computed in fp32 then cast to `dtype`."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: must be even for RoPE")
    pos = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
    idx = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (idx / head_dim))
    # fp64 angles: positions up to 1M times inv_freq lose phase precision in fp32.
    ang = pos.double()[..., None] * inv_freq.double()
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = upcast(x)
    x1, x2 = xf[..., :half], xf[..., half:]
    c = upcast(cos).unsqueeze(-2)  # broadcast over heads
    s = upcast(sin).unsqueeze(-2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


def _f32_table(t: torch.Tensor) -> torch.Tensor:
    # [1 or B, T, D/2] as fp32: a batch of 1 stays one row set (the kernel broadcasts it).
    return t.float().contiguous()


class _RoPECUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        c, s = _f32_table(cos), _f32_table(sin)
        qo, ko = extension().rope_fwd(q.contiguous(), k.contiguous(), c, s, False)
        ctx.save_for_backward(c, s)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        c, s = ctx.saved_tensors
        # The rotation is orthogonal: its adjoint is the rotation by -angle. Both in one launch.
        dq, dk = extension().rope_fwd(dq.contiguous(), dk.contiguous(), c, s, True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B,T,Hq,D] and k [B,T,Hk,D] by cos/sin [B or 1, T, D/2]; dtypes preserved."""
    if q.shape[-1] != k.shape[-1] or q.shape[-1] != 2 * cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"apply_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}"
                         f", sin {tuple(sin.shape)}: expected head_dim == 2 * cos.shape[-1]")
    if use_cuda(backend, q, k, cos, sin, kernel="apply_rope"):
        return _RoPECUDA.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def selftest_cases(device: torch.device) -> list[Case]:
    """Broadcast and per-batch cos/sin, Hq != Hk, vector-width and odd half head dims."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b, t, hq, hk, d, per_batch in ((2, 33, 4, 2, 128, False), (2, 9, 3, 1, 6, True),
                                           (1, 17, 2, 2, 64, True), (3, 5, 1, 1, 10, False)):
            def run(dtype=dtype, b=b, t=t, hq=hq, hk=hk, d=d, per_batch=per_batch):
                pos = torch.arange(t, device=device)
                pos = torch.stack([pos * (i + 1) % 4099 for i in range(b)]) if per_batch else pos
                ins = [randn(b, t, hq, d, device=device, seed=1), randn(b, t, hk, d, device=device, seed=2)]

                def fn(x, y, backend):
                    cos, sin = rope_cos_sin(pos, d, 10000.0, dtype=torch.promote_types(x.dtype, torch.float32))
                    return apply_rope(x, y, cos, sin, backend=backend)

                compare(fn, ins, dtype, device, f"rope B{b} T{t} Hq{hq} Hk{hk} D{d}")
            cases.append(Case(f"{dtype} B{b} T{t} Hq{hq} Hk{hk} D{d} per_batch={per_batch}", run))
    return cases
