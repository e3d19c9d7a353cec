#!/usr/bin/env python
"""Document-masked attention on one GPU: the candidates for megalm's packed batches, fwd + bwd.

    python benchmarks/attention.py [--iters 30] [--out PATH]      # a CUDA GPU
    python benchmarks/attention.py --smoke                         # CPU: the harness, tiny shapes

Issue 19 asks for document-masked attention (causal AND same-document) at <= 1.2x the unmasked
causal flash kernel, exact against an fp64 reference, with no T x T mask in memory — chosen by
measurement. Each candidate runs the same packed batch (GPT-2 124M's micro batch: B16 H12 T1024
D64, bf16, documents ~256 tokens; and the Llama-style 1B's: B8 H32 KV8 T2048 D64):

- `causal`: SDPA with is_causal (no document mask): the baseline, `<candidate>_ratio` is against it;
- `sdpa_dense_mask`: what megalm.models.llm runs today, SDPA with the [B, 1, T, T] bool mask
  (SDPA picks its backend: cuDNN on Hopper with torch 2.11);
- `sdpa_dense_mask_efficient`: the same mask forced onto the memory-efficient kernel;
- `varlen`: torch.nn.attention.varlen.varlen_attn (FlashAttention varlen) over cu_seqlens, which
  megalm's loader can compute on the host with the batch (precomputed here, outside the timing);
- `megalm_document_kernel`: megalm.ops.doc_attention's CUDA kernel (tensor cores, block skipping:
  only the key tiles from a query tile's first document start on), which the model runs whenever
  it passed its self-test (the row says whether it did); on --smoke its reference.

Per candidate: median fwd+bwd ms, peak memory above the inputs (the dense mask, built once per
forward for all layers, is reported apart as mask_mib), the largest difference from the fp64
reference (output and input gradients) and whether it materialises a T x T mask; a candidate this
torch cannot run says why instead. Documents are drawn from a fixed seed (lengths ~ exponential,
mean --mean-doc, default 256, cut at the row end like megalm's packing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.fsio import atomic_write  # noqa: E402
from megalm.models.llm import document_mask  # noqa: E402
from megalm.ops.doc_attention import document_attention, document_starts  # noqa: E402

SHAPES = {"gpt2-124m": dict(B=16, H=12, KV=12, T=1024, D=64), "llama-1b": dict(B=8, H=32, KV=8, T=2048, D=64)}
SMOKE = {"tiny": dict(B=2, H=2, KV=1, T=64, D=16)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def doc_ids_for(B: int, T: int, mean: float, seed: int) -> torch.Tensor:
    """[B, T] document ids: lengths drawn ~ exponential(mean), >= 1, the last cut at the row end."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < T:
            n = max(1, int(torch.empty(1).exponential_(1 / mean, generator=g).item()))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows)


def cu_seqlens_of(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets of every document in the flattened [B*T] batch (a row start also starts one), and the
    longest document: what varlen kernels take instead of a mask."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu = torch.cat([offsets, torch.tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """fp64 softmax(q kᵀ/√d + mask) v, [B, T, H, D], KV heads repeated."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~document_mask(doc_ids.to(q.device)), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _sdpa(q, k, v, mask, causal, backend=None):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # as megalm.models.llm: enable_gqa with a mask falls back to the math kernel
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if backend is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return y.transpose(1, 2)


def candidates(doc_ids: torch.Tensor, device: torch.device) -> dict[str, tuple[Callable, bool]]:
    """name -> (fn(q, k, v) -> [B, T, H, D], builds a T x T mask)."""
    from torch.nn.attention import SDPBackend

    mask = document_mask(doc_ids.to(device))
    cu, longest = cu_seqlens_of(doc_ids)
    cu = cu.to(device)
    out: dict[str, tuple[Callable, bool]] = {
        "causal": (lambda q, k, v: _sdpa(q, k, v, None, True), False),
        "sdpa_dense_mask": (lambda q, k, v: _sdpa(q, k, v, mask, False), True),
        "sdpa_dense_mask_efficient": (lambda q, k, v: _sdpa(q, k, v, mask, False, SDPBackend.EFFICIENT_ATTENTION),
                                      True),
    }

    def varlen(q, k, v):
        from torch.nn.attention.varlen import varlen_attn

        B, T, H, D = q.shape
        flat = [t.reshape(B * T, t.shape[2], D) for t in (q, k, v)]
        # window (-1, 0): causal, on every torch that has varlen_attn (2.11 defaults to it, 2.13 does not)
        kw = {"enable_gqa": True} if k.shape[2] != H else {}
        return varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0), **kw).reshape(B, T, H, D)

    out["varlen"] = (varlen, False)
    starts = document_starts(doc_ids.to(device))
    backend = "cuda" if device.type == "cuda" else "auto"
    out["megalm_document_kernel"] = (lambda q, k, v: document_attention(q, k, v, starts, backend=backend),
                                     device.type != "cuda")
    return out


def time_fwd_bwd(fn: Callable, q, k, v, iters: int) -> float:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dy = torch.ones_like(q)

    def run():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(*leaves), dy)

    if q.is_cuda:
        from benchmarks.ops import bench

        return bench(run, iters)
    run()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def errors(fn: Callable, q, k, v, doc_ids) -> dict[str, float]:
    """Largest |difference| from the fp64 reference: the output and each input gradient."""
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q.device)
    got = [t.detach().requires_grad_() for t in (q, k, v)]
    want = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y, y_ref = fn(*got), reference(*want, doc_ids)
    torch.autograd.backward(y, dy.to(y.dtype))
    torch.autograd.backward(y_ref, dy.double())
    out = {"out": (y.double() - y_ref).abs().max().item()}
    for name, a, b in zip("qkv", got, want):
        out[f"d{name}"] = (a.grad.double() - b.grad).abs().max().item()
    return out


def measure(shape: dict[str, int], dtype: torch.dtype, device: torch.device, iters: int, mean_doc: float) -> dict:
    B, H, KV, T, D = (shape[k] for k in "B H KV T D".split())
    doc_ids = doc_ids_for(B, T, mean_doc, seed=0)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, KV, KV))
    rows: dict[str, dict] = {}
    for name, (fn, dense) in candidates(doc_ids, device).items():
        try:
            # Exactness on the first two rows (the fp64 reference's T x T scores are the large part).
            err = (errors(candidates(doc_ids[:2], device)[name][0], q[:2], k[:2], v[:2], doc_ids[:2])
                   if name != "causal" else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds = time_fwd_bwd(fn, q, k, v, iters)
            row = {"ms": round(seconds * 1e3, 4), "materialises_txt_mask": dense, "max_abs_error_vs_fp64": err}
            if dense:  # built once per forward, outside the timing (shared by every layer)
                row["mask_mib"] = round(B * T * T / 2**20, 1)
            if name == "megalm_document_kernel" and device.type == "cuda":
                from megalm.ops import selftest

                ok, detail = selftest.verdict("document_attention", device)
                row["self_test"] = "passed" if ok else f"FAILED: {detail}"
            if device.type == "cuda":
                row["peak_memory_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        except (RuntimeError, NotImplementedError, ImportError, TypeError) as exc:
            row = {"unavailable": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        rows[name] = row
        log(f"{name}: {row}")
    base_ms = rows["causal"].get("ms")
    for name, row in rows.items():
        if name != "causal" and "ms" in row and base_ms:
            row["causal_ratio"] = round(row["ms"] / base_ms, 3)
    lengths = [int(n) for n in torch.unique_consecutive(doc_ids.reshape(-1), return_counts=True)[1]]
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "documents": len(lengths),
            "mean_document_tokens": round(sum(lengths) / len(lengths), 1), "candidates": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--mean-doc", type=float, default=256.0, help="mean document length in tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the harness only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: benchmarks/attention.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE if args.smoke else SHAPES
    mean = 16.0 if args.smoke else args.mean_doc
    results = {name: measure(shape, dtype, device, 3 if args.smoke else args.iters, mean)
               for name, shape in shapes.items()}
    result = {"benchmark": "document-masked attention, forward + backward",
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version()},
              "goal": "document-masked <= 1.2x causal, exact, no T x T mask", "shapes": results}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
