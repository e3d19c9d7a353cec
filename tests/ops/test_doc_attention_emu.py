"""The document-masked attention kernels' own source (csrc/doc_attention.cuh), run on the CPU.

csrc/emu/cuda_emu.h emulates the CUDA subset the kernels use (WMMA tiles, barriers, shuffles,
atomics) with one coroutine per CUDA thread on a deterministic schedule, so the indexing, the
masking, the block skipping and the online softmax are held here, without a GPU; the GPU
self-test (megalm.ops.doc_attention.selftest_cases) then checks the real tensor cores.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from megalm.models.llm import document_mask
from megalm.ops.doc_attention import (SELFTEST_DOCS, SMEM_BYTES, dense_mask, document_starts, reference,
                                      starts_of_lengths)
from megalm.ops.selftest import assert_as_good_as_eager
from tests.ops.emu import build, nan_like, reversed_order
from tests.ops.emu import ptr as _p

TILE = 64


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    return build("doc_attention_emu", tmp_path_factory.mktemp("emu"))


def emu_forward(emu, q, k, v, starts):
    B, T, Hq, D = q.shape
    o, lse, tiles = nan_like(q), torch.full((B, Hq, T), float("nan")), torch.zeros(1, dtype=torch.int32)
    rc = emu.megalm_emu_doc_attention_fwd(_p(q), _p(k), _p(v), _p(starts), _p(o), _p(lse), _p(tiles),
                                          B, T, Hq, k.shape[2], D)
    assert rc == 0, emu.megalm_emu_error().decode()
    return o, lse, int(tiles)


def emu_backward(emu, dout, q, k, v, o, lse, starts):
    B, T, Hq, D = q.shape
    delta, dq = torch.full((B, Hq, T), float("nan")), torch.zeros(B, T, Hq, D)  # dq: zeroed, as host.cpp does
    dk, dv, tiles = nan_like(k), nan_like(v), torch.zeros(1, dtype=torch.int32)
    rc = emu.megalm_emu_doc_attention_bwd(_p(dout), _p(q), _p(k), _p(v), _p(o), _p(lse), _p(starts),
                                          _p(delta), _p(dq), _p(dk), _p(dv), _p(tiles),
                                          B, T, Hq, k.shape[2], D)
    assert rc == 0, emu.megalm_emu_error().decode()
    return dq.to(q.dtype), dk, dv, int(tiles)


def tiles_to_visit(starts: torch.Tensor, heads: int, kv_heads: int) -> tuple[int, int]:
    """What block skipping must visit: forward, per query tile, the key tiles from its first query's
    document start to itself; backward, per key tile and query head, the query tiles from itself
    to the end of its last key's document."""
    fwd = bwd = 0
    for row in starts.tolist():
        T = len(row)
        for t0 in range(0, T, TILE):
            last = min(t0 + TILE, T) - 1
            fwd += last // TILE - row[t0] // TILE + 1
            q_end = max(i for i in range(last, T) if row[i] <= last)
            bwd += q_end // TILE - t0 // TILE + 1
    return fwd * heads, bwd * kv_heads * (heads // kv_heads)


CASES = [  # (Hq, Hk, D, document lengths per row)
    (4, 2, 64, SELFTEST_DOCS),
    (2, 2, 128, SELFTEST_DOCS),
    (3, 1, 64, [[64, 64, 64, 128, 1]]),   # documents on tile boundaries, a one-token row end
]


@pytest.mark.parametrize("reverse", [False, True], ids=["lanes_up", "lanes_down"])
@pytest.mark.parametrize("hq,hk,d,docs", CASES, ids=lambda c: str(c) if not isinstance(c, list) else "docs")
def test_kernels_match_the_fp64_reference(emu, hq, hk, d, docs, reverse):
    starts = starts_of_lengths(docs, torch.device("cpu"))
    B, T = starts.shape
    g = torch.Generator().manual_seed(hq * 100 + d)
    q, k, v, dout = (torch.randn(B, T, h, d, generator=g).to(torch.bfloat16) for h in (hq, hk, hk, hq))

    # The oracle sees the same bf16 inputs: what is left is the kernels' own arithmetic.
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    reference(*exact, starts).backward(dout.double())
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    want_bf16 = reference(*eager, starts)
    want_bf16.backward(dout)
    want = reference(*(t.detach() for t in exact), starts)

    with reversed_order(emu, reverse):  # a missing barrier shows on one schedule or the other
        o, lse, fwd_tiles = emu_forward(emu, q, k, v, starts)
        dq, dk, dv, bwd_tiles = emu_backward(emu, dout, q, k, v, o, lse, starts)
    assert_as_good_as_eager(o, want_bf16.detach(), want, torch.bfloat16, "out")
    for name, got, e, x in zip(("dq", "dk", "dv"), (dq, dk, dv), eager, exact):
        assert_as_good_as_eager(got, e.grad, x.grad, torch.bfloat16, name)
    # lse (log2 domain of the scaled scores) is what the backward trusts: check it directly.
    s = torch.einsum("bihd,bjhd->bhij", exact[0].detach(), exact[1].detach().repeat_interleave(hq // hk, 2))
    s = (s / d ** 0.5).masked_fill(~dense_mask(starts), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)),
                               rtol=0, atol=1e-4)
    assert (fwd_tiles, bwd_tiles) == tiles_to_visit(starts, hq, hk)


def test_block_skipping_reads_under_half_of_causal():
    # GPT-2's benchmark shape: 1024-token rows, here of 256-token documents and of a mix; counted
    # by hand: per 256-token document 1+2+3+4 tiles each way, the mixed row 77 each way.
    starts = starts_of_lengths([[256] * 4, [100, 300, 24, 600]], torch.device("cpu"))
    causal = 2 * sum(range(1, 1024 // TILE + 1))
    assert tiles_to_visit(starts, 1, 1) == (40 + 77, 40 + 77)
    assert (40 + 77) / causal < 0.45


@pytest.mark.parametrize("d", sorted(SMEM_BYTES))
def test_python_knows_the_kernels_shared_memory(emu, d):
    # What megalm.ops.doc_attention gates head dims by (per GPU) is what the kernels launch with.
    assert SMEM_BYTES[d] == max(emu.megalm_emu_smem_bytes(d, 0), emu.megalm_emu_smem_bytes(d, 1))


def test_starts_give_the_models_document_mask():
    doc_ids = torch.tensor([[0, 0, 1, 2, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    starts = document_starts(doc_ids)
    assert starts.dtype == torch.int32
    assert starts.tolist()[0] == [0, 0, 2, 3, 3, 3, 6]
    assert torch.equal(dense_mask(starts), document_mask(doc_ids))


@pytest.mark.parametrize("what,message", [(0, "not 32-byte aligned"), (1, "non-uniform __syncwarp")])
def test_emulation_reports_what_would_fault_on_a_gpu(emu, what, message):
    assert emu.megalm_emu_selfcheck(what) == 1
    assert message in emu.megalm_emu_error().decode()
