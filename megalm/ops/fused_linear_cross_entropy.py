"""LM head + cross-entropy over token chunks: full [N, V] logits never exist.

For each chunk of tokens: logits = h @ W^T, then the CE row op turns them (in place) into the
unscaled (softmax - onehot), from which dh and dW are accumulated right away — dW into ONE fp32
[V, D] buffer, no per-chunk [V, D] temporaries. Backward only applies dloss / n_targets in fp32
while casting to the parameter dtypes. With grad mode off (evaluation) only the loss is computed.
"""

from __future__ import annotations

import functools

import torch

from megalm.ops._backend import use_cuda
from megalm.ops.cross_entropy import backward_factor, ce_rows, scale_into, target_scale
from megalm.ops.selftest import Case, compare, randn


# One chunk's logits (in the compute dtype) take at most this much memory.
CHUNK_LOGITS_BYTES = 512 << 20


def auto_chunk_size(n_tokens: int, vocab: int, itemsize: int = 2) -> int:
    """Rows per chunk: the largest power of two whose [rows, vocab] logits fit CHUNK_LOGITS_BYTES
    (at least 256 rows, at most all of them).

    Why large: every chunk reads and writes the whole fp32 dW accumulator ([V, D], 8·V·D bytes)
    while its GEMMs do 6·rows·V·D FLOPs, so the accumulator's share of the time is about
    (4/3)·(FLOP/s ÷ bytes/s) / rows — on an H100/H200 (~700 TFLOP/s bf16, ~3.5 TB/s) 270/rows:
    128% at the old 256-row chunks of GPT-2's shape (64 chunks per micro batch), 7% at 4096 rows.
    The budget keeps the chunk at ≤ ~1/3 of the full logits from 16k tokens on at V=50k (4096
    rows) and at 2048 rows for V=128k.
    """
    if n_tokens <= 0:
        return 1
    rows = max(1, CHUNK_LOGITS_BYTES // max(1, vocab * itemsize))
    return min(n_tokens, max(256, 1 << (rows.bit_length() - 1)))


@functools.lru_cache(maxsize=8)
def _fp32_out_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm(out_dtype=float32, out=acc) accumulates a low-precision GEMM into an fp32
    buffer correctly here (cuBLAS only; the op is new and has had bugs), checked once per device."""
    if device.type != "cuda":
        return False
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(40, 24, generator=g, device=device).to(dtype).t()  # transposed, as g.t()
    b = torch.randn(40, 16, generator=g, device=device).to(dtype)
    acc = torch.randn(24, 16, generator=g, device=device)
    want = acc + a.float() @ b.float()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly fp16/bf16, without an [acc]-sized temporary."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_gemm_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # chunk-sized fp32 copies of the operands (CPU has no mixed-dtype GEMM)
        acc.addmm_(a.float(), b.float())


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, cuda):
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)
        lab = labels.reshape(-1).long().contiguous()
        w = weight.to(h.dtype)
        n, v = h.shape[0], w.shape[0]
        chunk = chunk_size or auto_chunk_size(n, v, h.element_size())
        scale = target_scale(lab, ignore_index, h.dtype)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_dh else None
        # dW summed over chunks in fp32 (fp64 for oracles): many bf16 partials would lose bits.
        dw = (torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32),
                          device=w.device) if need_dw else None)
        total = torch.zeros((), dtype=scale.dtype, device=h.device)
        for s, e in _chunks(n, chunk):
            hc = h[s:e]
            logits = hc @ w.t()
            loss_rows, g = ce_rows(logits, lab[s:e], ignore_index, cuda, inplace=True)
            total += loss_rows.sum()
            if need_dh:
                torch.mm(g, w, out=dh[s:e])
            if need_dw:
                accumulate_fp32(dw, g.t(), hc)
            del logits, g
        ctx.save_for_backward(dh, dw, scale)
        ctx.cuda = cuda
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        return (total * scale).reshape(())

    @staticmethod
    def backward(ctx, dloss):
        dh, dw, scale = ctx.saved_tensors
        factor = backward_factor(dloss, scale)
        gh = (scale_into(dh, factor, ctx.hidden_dtype, ctx.cuda).view(ctx.hidden_shape)
              if dh is not None else None)
        gw = scale_into(dw, factor, ctx.weight_dtype, ctx.cuda) if dw is not None else None
        return gh, gw, None, None, None, None


def _loss_only(hidden, weight, labels, ignore_index, chunk_size, cuda) -> torch.Tensor:
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    lab = labels.reshape(-1).long().contiguous()
    w = weight.to(h.dtype)
    n = h.shape[0]
    chunk = chunk_size or auto_chunk_size(n, w.shape[0], h.element_size())
    scale = target_scale(lab, ignore_index, h.dtype)
    total = torch.zeros((), dtype=scale.dtype, device=h.device)
    for s, e in _chunks(n, chunk):
        total += ce_rows(h[s:e] @ w.t(), lab[s:e], ignore_index, cuda, need_grad=False)[0].sum()
    return (total * scale).reshape(())


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """Mean CE of (hidden @ weight^T) vs labels without materialising the full logits.

    hidden [..., D], weight [V, D], labels [...] (same leading shape); chunk_size tokens per
    chunk (None: auto). Returns an fp32 scalar (fp64 for fp64 inputs).
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, labels {tuple(labels.shape)}: expected hidden "
                         "[..., D], weight [V, D], labels [...]")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size}: expected >= 1")
    cuda = use_cuda(backend, hidden, weight, labels, kernel="fused_linear_cross_entropy")
    dev = hidden.device.type
    # ctx.needs_input_grad ignores torch.no_grad(): decide here whether any gradient is wanted.
    fn = (_FusedLinearCE.apply
          if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
          else _loss_only)
    if torch.is_autocast_enabled(dev):
        # Under autocast the head matmul would run in the autocast dtype while our buffers follow
        # hidden's dtype; cast once up front and run with autocast off.
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return fn(hidden.to(dtype), weight.to(dtype), labels, ignore_index, chunk_size, cuda)
    return fn(hidden, weight, labels, ignore_index, chunk_size, cuda)


def selftest_cases(device: torch.device) -> list[Case]:
    """Chunks with a remainder, ignored rows, every dtype; loss-only mode equals the loss."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def run(dtype=dtype):
            g = torch.Generator(device=device).manual_seed(1)
            lab = torch.randint(0, 3001, (257,), generator=g, device=device)
            lab[:40] = -100
            ins = [randn(257, 96, device=device, seed=2), randn(3001, 96, device=device, seed=3, scale=0.1)]
            fn = lambda h, w, backend: fused_linear_cross_entropy(h, w, lab, chunk_size=100,  # noqa: E731
                                                                  backend=backend)
            compare(fn, ins, dtype, device, "fused_linear_ce")
            compare(fn, ins, dtype, device, "fused_linear_ce loss only", grad=False)
        cases.append(Case(f"{dtype} 257x96 V3001 chunk 100", run))
    return cases
