"""Newton–Schulz orthogonalisation for Muon: the quintic iteration DeepSpeed's and modded-nanogpt's
`zeropower_via_newtonschulz5` run (coefficients a, b, c = 3.4445, -4.7750, 2.0315), in bf16.

    X = G / (||G||_F + 1e-7)                    (on the wide orientation: rows <= cols)
    repeat `steps` times:  A = X Xᵀ;  X = a X + (b A + c A²) X

Returns bf16 (the iteration's dtype; Muon casts the update back). The reference is that exact
composition in PyTorch (bit-identical to DeepSpeed's source run eagerly). The CUDA path
(csrc/newton_schulz.cu + host.cpp) computes 1 / (||G||_F + eps) on the device in one launch and
writes G times it as bf16 in a second (scale.cu's kernel; no host sync), rounding once from the
input's precision; every elementwise term of the iteration rides in a cuBLAS GEMM epilogue
(`addmm`'s alpha/beta): 3 GEMMs per iteration and nothing else, against 3 matmuls and 5
elementwise kernels in eager PyTorch. The GEMMs are cuBLAS's (bf16 in, fp32 accumulation);
nothing custom there. A float64 input runs the reference in float64 (the oracle).
"""

from __future__ import annotations

import torch

from megalm.ops._backend import extension, use_cuda
from megalm.ops.selftest import Case, assert_as_good_as_eager, randn

COEFFS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
STEPS = 5


def newton_schulz_reference(g: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """The iteration on the last two dims of `g` (batches allowed), in bf16 (float64 for float64)."""
    a, b, c = COEFFS
    x = g.to(torch.float64 if g.dtype == torch.float64 else torch.bfloat16)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + EPS)
    for _ in range(steps):
        m = x @ x.mT
        p = b * m + c * m @ m
        x = a * x + p @ x
    return x.mT if tall else x


def newton_schulz(g: torch.Tensor, steps: int = STEPS, backend: str = "auto") -> torch.Tensor:
    """Orthogonalise `g` ([..., rows, cols]); signature of DeepSpeed's `zeropower_via_newtonschulz5`,
    which megalm's Muon replaces with this (megalm.train.muon)."""
    if g.dim() < 2:
        raise ValueError(f"newton_schulz: expected a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    if not use_cuda(backend, g, kernel="newton_schulz"):
        return newton_schulz_reference(g, steps)
    a, b, c = COEFFS
    ext = extension()
    if g.dim() == 2:
        return ext.newton_schulz(g.contiguous(), steps, a, b, c, EPS)
    # Per-head / per-expert batches: the kernel is per matrix.
    flat = g.reshape(-1, *g.shape[-2:])
    return torch.stack([ext.newton_schulz(m.contiguous(), steps, a, b, c, EPS) for m in flat]).view(g.shape)


def selftest_cases(device: torch.device) -> list[Case]:
    """Odd, tall, wide, square and batched shapes from fp32/bf16/fp16 inputs, a tiny-norm input,
    against the reference in bf16 and the float64 iteration (the shared accuracy rule)."""
    cases = []
    shapes = ((37, 101), (300, 64), (64, 300), (128, 128), (1, 17), (3, 48, 80))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in shapes:
            def run(dtype=dtype, shape=shape):
                g = randn(*shape, device=device, seed=11)
                _check(g, dtype, f"newton_schulz {tuple(shape)}")
            cases.append(Case(f"{dtype} {shape}", run))

    def tiny():  # a norm far below 1: the scale must come from the fp32 norm, not underflow
        _check(randn(96, 40, device=device, seed=12, scale=1e-6), torch.float32, "newton_schulz tiny norm")
    cases.append(Case("tiny norm", tiny))
    return cases


def _check(g: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    x = g.to(dtype)
    kernel = newton_schulz(x, backend="cuda")
    eager = newton_schulz(x, backend="reference")
    oracle = newton_schulz_reference(x.double())  # the same (rounded) input, iterated in float64
    # Both run the iteration in bf16; the accuracy rule is judged at bf16's floor.
    assert_as_good_as_eager(kernel, eager, oracle, torch.bfloat16, what)
