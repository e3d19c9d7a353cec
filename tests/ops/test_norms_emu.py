"""The norm kernels' own source (csrc/layer_norm.cu, csrc/rms_norm.cu), run on the CPU through the
CUDA emulation (csrc/emu/cuda_emu.h; see test_doc_attention_emu.py): forward, backward with its
per-group weight-grad partials, and the column sum, driven the way host.cpp drives them, against
the fp64 reference with the self-test's accuracy rule. Held here: the scalar and 16-byte vector
paths, rows cached in registers or re-read, weight grads accumulated in shared memory or not,
affine params in fp32 or in x's bf16 (read uncast, grads returned in their dtype)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from megalm.ops.layer_norm import layer_norm_reference
from megalm.ops.rms_norm import rms_norm_reference
from megalm.ops.selftest import assert_as_good_as_eager
from tests.ops.emu import build, check, nan_like, ptr, reversed_order

I64, F32 = ctypes.c_int64, ctypes.c_float
CODE = {torch.float32: 0, torch.bfloat16: 1}


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    return build("norms_emu", tmp_path_factory.mktemp("emu"))


def groups(emu, rows: int, cols: int, elem: int) -> int:
    """host.cpp partial_groups on the emulated 132-SM device."""
    threads = emu.megalm_emu_norm_row_threads(I64(cols), I64(elem))
    return max(1, min(rows, max(1, min(16, 1024 // threads)) * 132))


def column_sum(emu, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    B, G, C = part.shape
    out = torch.full((B, C), float("nan"), dtype=dtype)
    check(emu, emu.megalm_emu_column_sum(int(dtype == torch.float32), ptr(part), ptr(out), I64(B), I64(G), I64(C)))
    return out


def emu_rms(emu, x, w, dy, G):
    R, C = x.shape
    y, rstd, dx = nan_like(x), torch.full((R,), float("nan")), nan_like(x)
    w32 = int(w.dtype == torch.float32)
    check(emu, emu.megalm_emu_rms_norm_fwd(CODE[x.dtype], w32, ptr(x), ptr(w), ptr(y), ptr(rstd), I64(R), I64(C),
                                           F32(1e-5)))
    part = torch.full((1, G, C), float("nan"))  # the kernel initialises every partial
    check(emu, emu.megalm_emu_rms_norm_bwd(CODE[x.dtype], w32, ptr(dy), ptr(x), ptr(w), ptr(rstd), ptr(dx),
                                           ptr(part), I64(R), I64(C), I64(G)))
    return y, dx, column_sum(emu, part, w.dtype)[0]


def emu_ln(emu, x, w, b, dy, G):
    R, C = x.shape
    y, dx = nan_like(x), nan_like(x)
    mean, rstd = torch.full((R,), float("nan")), torch.full((R,), float("nan"))
    w32 = int(w.dtype == torch.float32)
    check(emu, emu.megalm_emu_layer_norm_fwd(CODE[x.dtype], w32, ptr(x), ptr(w), ptr(b), ptr(y), ptr(mean),
                                             ptr(rstd), I64(R), I64(C), F32(1e-5)))
    parts = torch.full((2, G, C), float("nan"))  # weight's and bias's partials: one column sum
    check(emu, emu.megalm_emu_layer_norm_bwd(CODE[x.dtype], w32, ptr(dy), ptr(x), ptr(w), ptr(mean), ptr(rstd),
                                             ptr(dx), ptr(parts[0]), ptr(parts[1]), I64(R), I64(C), I64(G)))
    dw, db = column_sum(emu, parts, w.dtype)
    return y, dx, dw, db


def _inputs(R, C, dtype, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(R, C, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w, b = (torch.randn(C, generator=g, dtype=torch.float64).to(wdtype) for _ in range(2))
    dy = torch.randn(R, C, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _reference(fn, inputs, dy):
    """(outputs, grads) of fn on these inputs as given, and on their fp64 copies."""
    runs = []
    for cast in (lambda t: t, torch.Tensor.double):
        xs = [cast(t).detach().requires_grad_() for t in inputs]
        y = fn(*xs)
        y.backward(cast(dy))
        runs.append((y.detach(), [t.grad for t in xs]))
    return runs


# (rows, cols): GPT-2's width (16-byte vectors, one warp per row), an odd width (scalar path), a
# wide row (several warps), one whose weight-grad partials need more than 48 KiB of shared memory
# (the opt-in), one past the 4 x 1024-vector register cache (re-read rows; LayerNorm's two partial
# rows no longer fit shared memory), and one where RMSNorm's do not either (partials straight to
# memory for both).
SHAPES = [(37, 768), (9, 77), (5, 4096), (3, 16384)]
MODES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
BF16, MIXED, FP32 = MODES
# The wide rows (a 1024-thread block each, the slow part of the emulation) in two modes each, on
# the path they are there for: LayerNorm's partials leave shared memory at 32776 columns,
# RMSNorm's at 57352.
LN_CASES = [(shape, *mode) for shape in SHAPES for mode in MODES] + [((2, 32776), *BF16), ((2, 32776), *MIXED)]
RMS_CASES = [(shape, *mode) for shape in SHAPES for mode in MODES] + [((2, 57352), *BF16), ((2, 57352), *FP32)]


def _ids(case):
    (r, c), x, w = case
    return f"{r}x{c}-{str(x)[6:]}-{str(w)[6:]}"


@pytest.mark.parametrize("shape,dtype,wdtype", RMS_CASES, ids=[_ids(c) for c in RMS_CASES])
def test_rms_norm_kernels(emu, shape, dtype, wdtype):
    R, C = shape
    x, w, _, dy = _inputs(R, C, dtype, wdtype, seed=C)
    for G in sorted({groups(emu, R, C, x.element_size()), 2}):  # host.cpp's choice, and rows sharing groups
        y, dx, dw = emu_rms(emu, x, w, dy, G)
        (ye, ge), (yo, go) = _reference(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], dy)
        assert dw.dtype == wdtype
        for name, got, eager, oracle in (("y", y, ye, yo), ("dx", dx, ge[0], go[0]), ("dw", dw, ge[1], go[1])):
            assert_as_good_as_eager(got, eager.to(got.dtype), oracle, dtype, f"rms {name} G={G}")


@pytest.mark.parametrize("shape,dtype,wdtype", LN_CASES, ids=[_ids(c) for c in LN_CASES])
def test_layer_norm_kernels(emu, shape, dtype, wdtype):
    R, C = shape
    x, w, b, dy = _inputs(R, C, dtype, wdtype, seed=C + 1)
    for G in sorted({groups(emu, R, C, x.element_size()), 2}):
        y, dx, dw, db = emu_ln(emu, x, w, b, dy, G)
        (ye, ge), (yo, go) = _reference(lambda a, c, d: layer_norm_reference(a, c, d, 1e-5), [x, w, b], dy)
        assert dw.dtype == db.dtype == wdtype
        for name, got, eager, oracle in (("y", y, ye, yo), ("dx", dx, ge[0], go[0]), ("dw", dw, ge[1], go[1]),
                                         ("db", db, ge[2], go[2])):
            assert_as_good_as_eager(got, eager.to(got.dtype), oracle, dtype, f"ln {name} G={G}")


@pytest.mark.parametrize("shape", [(37, 768), (5, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_norm_kernels_on_the_reversed_schedule(emu, shape):
    # Lanes and warps in decreasing order: a barrier missing between a lane's write and another's
    # read shows on one schedule or the other.
    with reversed_order(emu):
        test_rms_norm_kernels(emu, shape, torch.bfloat16, torch.bfloat16)
        test_layer_norm_kernels(emu, shape, torch.bfloat16, torch.float32)
