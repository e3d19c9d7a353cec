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
from tests.ops.emu import build, check, ptr

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
    out = torch.empty(B, C, dtype=dtype)
    check(emu, emu.megalm_emu_column_sum(int(dtype == torch.float32), ptr(part), ptr(out), I64(B), I64(G), I64(C)))
    return out


def emu_rms(emu, x, w, dy, G):
    R, C = x.shape
    y, rstd, dx = torch.empty_like(x), torch.empty(R), torch.empty_like(x)
    w32 = int(w.dtype == torch.float32)
    check(emu, emu.megalm_emu_rms_norm_fwd(CODE[x.dtype], w32, ptr(x), ptr(w), ptr(y), ptr(rstd), I64(R), I64(C),
                                           F32(1e-5)))
    part = torch.empty(1, G, C)
    check(emu, emu.megalm_emu_rms_norm_bwd(CODE[x.dtype], w32, ptr(dy), ptr(x), ptr(w), ptr(rstd), ptr(dx),
                                           ptr(part), I64(R), I64(C), I64(G)))
    return y, dx, column_sum(emu, part, w.dtype)[0]


def emu_ln(emu, x, w, b, dy, G):
    R, C = x.shape
    y, mean, rstd, dx = torch.empty_like(x), torch.empty(R), torch.empty(R), torch.empty_like(x)
    w32 = int(w.dtype == torch.float32)
    check(emu, emu.megalm_emu_layer_norm_fwd(CODE[x.dtype], w32, ptr(x), ptr(w), ptr(b), ptr(y), ptr(mean),
                                             ptr(rstd), I64(R), I64(C), F32(1e-5)))
    parts = torch.empty(2, G, C)  # weight's and bias's partials in one buffer: one column sum
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
# wide row (several warps), one past the 4 x 1024-vector register cache with more weight-grad
# columns than shared memory holds (re-read rows, partials straight to memory).
SHAPES = [(37, 768), (9, 77), (5, 4096), (2, 4 * 1024 * 8 + 8)]
MODES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,wdtype", MODES, ids=lambda d: str(d).replace("torch.", ""))
def test_rms_norm_kernels(emu, shape, dtype, wdtype):
    R, C = shape
    x, w, _, dy = _inputs(R, C, dtype, wdtype, seed=C)
    for G in sorted({groups(emu, R, C, x.element_size()), 2}):  # host.cpp's choice, and rows sharing groups
        y, dx, dw = emu_rms(emu, x, w, dy, G)
        (ye, ge), (yo, go) = _reference(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], dy)
        assert dw.dtype == wdtype
        for name, got, eager, oracle in (("y", y, ye, yo), ("dx", dx, ge[0], go[0]), ("dw", dw, ge[1], go[1])):
            assert_as_good_as_eager(got, eager.to(got.dtype), oracle, dtype, f"rms {name} G={G}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,wdtype", MODES, ids=lambda d: str(d).replace("torch.", ""))
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
