#!/usr/bin/env python
"""Fused-ops benchmark (needs a CUDA GPU and a built extension: `megalm ops build`).

    python benchmarks/ops.py [--out benchmarks/results/ops_<gpu>.json] [--iters 50]

Per op (forward + backward where there is one): time of our kernel and of the same-run
baselines — our PyTorch reference (eager) and, where torch has one, torch's own op — as
`speedup_vs_eager` / `speedup_vs_torch`; bytes moved / time as GB/s and % of HBM bandwidth
(H100 3.35 TB/s, H200 4.8 TB/s). Cross-entropy: peak memory of fused linear CE at vocab 128k x
8k tokens vs F.cross_entropy(h @ W^T) (`peak_memory_ratio`). AdamW: vs
torch.optim.AdamW(foreach=True) and (fused=True).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, cross_entropy,  # noqa: E402
                        fused_linear_cross_entropy, layer_norm, rms_norm, rope_cos_sin, swiglu)
from megalm.ops import _backend  # noqa: E402

HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


def hbm_peak_tbps() -> float | None:
    name = torch.cuda.get_device_name()
    for key, tbps in HBM_TBPS.items():
        if key in name:
            return tbps
    return None


def bench(fn, iters: int) -> float:
    """Median seconds per call, CUDA-event timed after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def fwd_bwd(op, inputs, **kw):
    def run():
        xs = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
        y = op(*xs, **kw)
        y = y if isinstance(y, tuple) else (y,)
        torch.autograd.backward(y, [torch.ones_like(o) for o in y])
    return run


def row(name, nbytes, times: dict[str, float], peak):
    ours = times["cuda"]
    out = {"op": name, "bytes": nbytes, "seconds": {k: round(v, 7) for k, v in times.items()},
           "gb_per_s": round(nbytes / ours / 1e9, 1)}
    if peak:
        out["pct_of_hbm_peak"] = round(100 * nbytes / ours / (peak * 1e12), 1)
    for k, v in times.items():
        if k != "cuda":
            out[f"speedup_vs_{k}"] = round(v / ours, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert _backend.extension() is not None, _backend.unavailable_reason()
    dev, bf = "cuda", torch.bfloat16
    peak = hbm_peak_tbps()
    rows = []
    n_tok, d = 16384, 4096
    x = torch.randn(n_tok, d, device=dev, dtype=bf)
    w = torch.ones(d, device=dev, dtype=bf)
    b = torch.zeros(d, device=dev, dtype=bf)
    el = x.element_size()
    cases = [
        # name, op builder (backend -> callable), bytes of fwd+bwd (x, y, dy, dx)
        ("rms_norm fwd+bwd bf16 16384x4096",
         {k: fwd_bwd(rms_norm, [x, w], backend=k) for k in ("cuda", "reference")} |
         {"torch": fwd_bwd(lambda a, b_: F.rms_norm(a, (d,), b_, 1e-5), [x, w])}, 4 * x.numel() * el),
        ("layer_norm fwd+bwd bf16 16384x4096",
         {k: fwd_bwd(layer_norm, [x, w, b], backend=k) for k in ("cuda", "reference")} |
         {"torch": fwd_bwd(lambda a, w_, b_: F.layer_norm(a, (d,), w_, b_), [x, w, b])},
         4 * x.numel() * el),
    ]
    xa = x.view(8, 2048, d)
    sh, sc = torch.randn(8, d, device=dev, dtype=bf), torch.randn(8, d, device=dev, dtype=bf)
    cases.append(("adaln fwd+bwd bf16 8x2048x4096",
                  {k: fwd_bwd(adaln_layer_norm, [xa, sh, sc], backend=k) for k in ("cuda", "reference")},
                  4 * x.numel() * el))
    q = torch.randn(8, 2048, 32, 128, device=dev, dtype=bf)
    kk = torch.randn(8, 2048, 8, 128, device=dev, dtype=bf)
    cos, sin = rope_cos_sin(torch.arange(2048, device=dev), 128)
    cases.append(("rope fwd+bwd bf16 q 8x2048x32x128 k 8 heads",
                  {k: fwd_bwd(lambda a, b_, backend: apply_rope(a, b_, cos, sin, backend=backend),
                              [q, kk], backend=k) for k in ("cuda", "reference")},
                  4 * (q.numel() + kk.numel()) * el))
    gt = torch.randn(16384, 11008, device=dev, dtype=bf)
    up = torch.randn_like(gt)
    cases.append(("swiglu fwd+bwd bf16 16384x11008",
                  {k: fwd_bwd(swiglu, [gt, up], backend=k) for k in ("cuda", "reference")} |
                  {"torch": fwd_bwd(lambda a, b_: F.silu(a) * b_, [gt, up])},
                  7 * gt.numel() * el))  # fwd: 2 in 1 out; bwd: 3 in 2 out... minus shared reads
    logits = torch.randn(8192, 32000, device=dev, dtype=bf)
    labels = torch.randint(0, 32000, (8192,), device=dev)
    cases.append(("cross_entropy fwd+bwd bf16 8192x32000",
                  {k: fwd_bwd(lambda a, backend: cross_entropy(a, labels, backend=backend), [logits],
                              backend=k) for k in ("cuda", "reference")} |
                  {"torch": fwd_bwd(lambda a: F.cross_entropy(a.float(), labels), [logits])},
                  3 * logits.numel() * el))  # read twice, write grad once; backward scale ~1 more
    for name, fns, nbytes in tqdm(cases, desc="ops"):
        rows.append(row(name, nbytes, {k: bench(f, args.iters) for k, f in fns.items()}, peak))
        torch.cuda.empty_cache()

    # Peak memory of the LM-head loss at vocab 128k x 8k tokens, hidden 4096, bf16.
    V, N, D = 128 * 1024, 8192, 4096
    h = torch.randn(N, D, device=dev, dtype=bf) * 0.1
    W = torch.randn(V, D, device=dev, dtype=bf) * 0.02
    lab = torch.randint(0, V, (N,), device=dev)
    mem = {}
    for name, fn in [("fused_linear_ce", lambda a, b_: fused_linear_cross_entropy(a, b_, lab)),
                     ("torch_matmul_then_ce", lambda a, b_: F.cross_entropy((a @ b_.t()).float(), lab))]:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = bench(fwd_bwd(fn, [h, W]), max(3, args.iters // 10))
        mem[name] = {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "seconds": round(t, 5)}
    mem["peak_memory_ratio"] = round(mem["fused_linear_ce"]["peak_extra_bytes"] /
                                     mem["torch_matmul_then_ce"]["peak_extra_bytes"], 3)
    mem["speedup_vs_torch"] = round(mem["torch_matmul_then_ce"]["seconds"] /
                                    mem["fused_linear_ce"]["seconds"], 2)
    del h, W

    # AdamW over a 1B-parameter-like mix of tensors (bf16 params + fp32 masters vs fp32 torch).
    shapes = [(4096, 4096)] * 24 + [(11008, 4096)] * 12 + [(4096,)] * 48
    adam = {}
    for name, make in [
        ("ours_fp32", lambda ps: FusedAdamW(ps, lr=1e-4, weight_decay=0.1)),
        ("torch_foreach_fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True)),
        ("torch_fused_fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True)),
    ]:
        ps = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = make(ps)
        adam[name] = bench(opt.step, max(5, args.iters // 5))
        del ps, opt
        torch.cuda.empty_cache()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    adam_row = {"params": n_params, "seconds": {k: round(v, 6) for k, v in adam.items()},
                "speedup_vs_torch_foreach": round(adam["torch_foreach_fp32"] / adam["ours_fp32"], 2),
                "speedup_vs_torch_fused": round(adam["torch_fused_fp32"] / adam["ours_fp32"], 2),
                # fp32: read p, g, m, v; write p, m, v
                "gb_per_s": round(7 * 4 * n_params / adam["ours_fp32"] / 1e9, 1)}
    result = {
        "benchmark": "megalm.ops fused CUDA kernels",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(), "hbm_peak_tb_per_s": peak,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "ops": rows, "lm_head_loss_vocab128k_8k_tokens": mem, "adamw": adam_row,
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "ops_" + torch.cuda.get_device_name().split()[-1].lower() + ".json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
