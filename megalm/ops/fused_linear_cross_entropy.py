"""LM head + cross-entropy over token chunks: full [N, V] logits never exist.

For each chunk of tokens: logits = h @ W^T, then the CE row op turns them (in place) into
dlogits, from which dh and dW are accumulated right away; backward only scales the results.
"""

from __future__ import annotations

import math

import torch

from megalm.ops._backend import use_cuda
from megalm.ops.cross_entropy import ce_rows, target_scale


def auto_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Chunk so that one chunk's logits are about as large as the whole hidden input."""
    chunk = max(1, math.ceil(n_tokens / max(1, math.ceil(vocab / hidden))))
    return min(n_tokens, max(256, 1 << (chunk - 1).bit_length())) if n_tokens else 1


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, cuda):
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)
        lab = labels.reshape(-1).long().contiguous()
        w = weight.to(h.dtype)
        n, v = h.shape[0], w.shape[0]
        chunk = chunk_size or auto_chunk_size(n, v, d)
        scale = target_scale(lab, ignore_index, h.dtype, cuda)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_dh else None
        # Accumulate dW across chunks in fp32: summing many bf16 partials would lose bits.
        acc = torch.promote_types(w.dtype, torch.float32)
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
        total = torch.zeros((), dtype=scale.dtype, device=h.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc = h[s:e]
            logits = hc @ w.t()
            loss_rows, g = ce_rows(logits, lab[s:e], ignore_index, scale, cuda, inplace=True)
            total += loss_rows.sum()
            if need_dh:
                torch.mm(g, w, out=dh[s:e])
            if need_dw:
                if w.dtype == acc:
                    dw.addmm_(g.t(), hc)
                else:
                    dw += (g.t() @ hc).to(acc)
        ctx.save_for_backward(dh if need_dh else None, dw if need_dw else None)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        gh = (dh * dloss.to(dh.dtype)).view(ctx.hidden_shape) if dh is not None else None
        gw = (dw * dloss).to(ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """Mean CE of (hidden @ weight^T) vs labels without materialising the full logits.

    hidden [..., D], weight [V, D], labels [...] (same leading shape); chunk_size tokens per
    chunk (None: auto). Returns an fp32 scalar.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, labels {tuple(labels.shape)}: expected hidden "
                         "[..., D], weight [V, D], labels [...]")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size}: expected >= 1")
    cuda = use_cuda(backend, hidden, weight, labels)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast the head matmul would run in the autocast dtype while our buffers follow
        # hidden's dtype; cast once up front and run the Function with autocast off.
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _FusedLinearCE.apply(hidden.to(dtype), weight.to(dtype), labels, ignore_index,
                                        chunk_size, cuda)
    return _FusedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_size, cuda)
