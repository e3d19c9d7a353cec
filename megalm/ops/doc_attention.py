"""Causal attention within the documents of packed rows, without a T x T mask.

Query i sees key j iff starts[i] <= j <= i, where starts[i] is the first position of i's
document in its row (`document_starts(doc_ids)`): the same mask as megalm.models.llm's dense
`document_mask`, kept as one int32 per token. The CUDA kernel (csrc/doc_attention.cuh) reads
only the key blocks a query tile can see — with ~256-token documents in 1024-token rows about a
third of causal attention's work, where SDPA with a dense mask does all of it and more — and
never materialises scores or a mask. The reference is SDPA with the dense mask.

Layouts are the model's: q [B, T, Hq, D], k/v [B, T, Hk, D] (Hq a multiple of Hk), out like q.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megalm.ops._backend import extension, use_cuda
from megalm.ops.selftest import Case, compare, randn

HEAD_DIMS = (64, 128)
# Dynamic shared memory per block the kernels need at each head dim (the larger of forward and
# backward, csrc/doc_attention.cuh FwdSmem/BwdSmem; test_doc_attention_emu.py holds these to the
# kernels' own figures). D=128 needs more than sm_86/sm_89 GPUs (A10, L4, L40S) allow a block.
SMEM_BYTES = {64: 90_896, 128: 123_664}


@functools.lru_cache(maxsize=None)
def smem_per_block(device_index: int) -> int:
    """Opt-in shared memory per block of a CUDA device, in bytes."""
    props = torch.cuda.get_device_properties(device_index)
    known = {(8, 0): 166_912, (9, 0): 232_448}  # A100, H100/H200; other sm_8x: 101,376
    return int(getattr(props, "shared_memory_per_block_optin", 0)) or known.get((props.major, props.minor), 101_376)


def head_dim_fits(head_dim: int, device: torch.device) -> bool:
    """Whether this head dim's kernels fit the device's shared memory (always on a non-CUDA device:
    nothing launches there)."""
    if head_dim not in SMEM_BYTES:
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return smem_per_block(index) >= SMEM_BYTES[head_dim]


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, T]: the position where each token's document starts in its row (a run of equal
    ids is one document; no host sync)."""
    T = doc_ids.shape[1]
    pos = torch.arange(T, device=doc_ids.device).expand(doc_ids.shape)
    new = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(new, pos, 0).cummax(dim=1).values.to(torch.int32)


def dense_mask(starts: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T]: True where query i may attend key j (starts[i] <= j <= i)."""
    j = torch.arange(starts.shape[1], device=starts.device)
    return ((j[None, None, :] <= j[None, :, None])
            & (j[None, None, :] >= starts[:, :, None].long())).unsqueeze(1)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """SDPA over the dense mask, KV heads repeated for grouped queries; [B, T, Hq, D]."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense_mask(starts)).transpose(1, 2)


def kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel takes: half/bfloat16, head dim 64 or 128 (128 where the GPU's
    shared memory holds it), grouped KV heads."""
    return (q.dim() == 4 and k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
            and k.shape[-1] == q.shape[-1] and k.shape[:2] == q.shape[:2]
            and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0 and q.shape[1] > 0
            and head_dim_fits(q.shape[-1], q.device))


def kernel_will_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `document_attention` would run the kernel (the model otherwise keeps its dense
    mask, built once for all layers)."""
    return kernel_fits(q, k, v) and use_cuda(backend, q, k, v, kernel="document_attention")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # The kernels read 16-byte vectors: a view at an odd offset into its storage gets a copy.
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _DocAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts):
        q, k, v, starts = (_aligned(t.contiguous()) for t in (q, k, v, starts))
        out, lse = extension().doc_attention_fwd(q, k, v, starts)
        ctx.save_for_backward(q, k, v, starts, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, starts, out, lse = ctx.saved_tensors
        dq, dk, dv = extension().doc_attention_bwd(_aligned(dout.contiguous()), q, k, v, out, lse, starts)
        return dq, dk, dv, None


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                       backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ/√D over keys starts[i] <= j <= i) v; q [B, T, Hq, D], k/v [B, T, Hk, D],
    starts int32 [B, T] (`document_starts`). Returns [B, T, Hq, D] in q's dtype."""
    if starts.shape != q.shape[:2] or k.shape[:2] != q.shape[:2] or q.shape[2] % max(1, k.shape[2]):
        raise ValueError(f"document_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, starts "
                         f"{tuple(starts.shape)}: expected q [B, T, Hq, D], k/v [B, T, Hk, D] with "
                         "Hk dividing Hq, starts [B, T]")
    if kernel_fits(q, k, v) and use_cuda(backend, q, k, v, kernel="document_attention"):
        return _DocAttention.apply(q, k, v, starts.to(torch.int32))
    return reference(q, k, v, starts)


def starts_of_lengths(lengths: list[list[int]], device: torch.device) -> torch.Tensor:
    """int32 [B, T] starts of rows made of documents of the given lengths (each row sums to T)."""
    rows = []
    for row in lengths:
        starts, pos = [], 0
        for n in row:
            starts += [pos] * n
            pos += n
        rows.append(starts)
    return torch.tensor(rows, dtype=torch.int32, device=device)


# Rows that hit the hard cases: a row-end remainder tile (T not a multiple of 64), documents of
# one token, documents crossing tiles, a whole row one document (plain causal), tiles whose first
# query's document starts several tiles back.
SELFTEST_DOCS = [[1, 70, 3, 9, 117], [200], [130, 1, 69]]


def selftest_cases(device: torch.device) -> list[Case]:
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        for hq, hk, d in ((4, 2, 64), (2, 2, 128), (3, 1, 64)):
            if not head_dim_fits(d, device):  # the model never sends it there either
                continue

            def run(dtype=dtype, hq=hq, hk=hk, d=d):
                starts = starts_of_lengths(SELFTEST_DOCS, device)
                B, T = starts.shape
                ins = [randn(B, T, hq, d, device=device, seed=1), randn(B, T, hk, d, device=device, seed=2),
                       randn(B, T, hk, d, device=device, seed=3)]
                fn = lambda q, k, v, backend: document_attention(q, k, v, starts, backend=backend)  # noqa: E731
                compare(fn, ins, dtype, device, f"document_attention Hq{hq} Hk{hk} D{d}")
            cases.append(Case(f"{dtype} Hq{hq} Hk{hk} D{d} T200", run))
    return cases
