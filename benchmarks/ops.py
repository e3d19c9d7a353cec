#!/usr/bin/env python
"""Fused-ops benchmark on a CUDA GPU (run `megalm ops build` first; `make test-gpu` does).

    python benchmarks/ops.py [--iters 30] [--no-compile] [--out PATH]

Per op and dtype, forward + backward at default settings: median time of our kernel and of the
same-run baselines — PyTorch eager (our reference composition, and torch's own op where it has
one) and torch.compile of the reference — as `speedup_vs_<baseline>`, plus the minimum DRAM
bytes the op must move (norms and adaLN: 5 row passes — read x, write y; read dy, read x,
write dx; SwiGLU: 8 — 3 forward, 5 backward; RoPE: 4 passes over q and k; CE: 3 forward — two
reads of the logits, one gradient write — and 2 backward — read, scale-write) as GB/s and % of the
device's peak HBM bandwidth (from its memory clock and bus width) and of a measured device copy.
LM-head loss at vocab 128k: fused linear CE vs logits = h @ W^T + F.cross_entropy, time and peak
memory. AdamW: ours vs torch.optim.AdamW(foreach) and (fused). Newton–Schulz (Muon, 5 quintic
steps) on GPT-2 124M and 7B-class matrices: ours vs the eager reference. JSON under benchmarks/results/.
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
from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, cross_entropy,  # noqa: E402
                        fused_linear_cross_entropy, layer_norm, newton_schulz, rms_norm, rope_cos_sin,
                        swiglu)
from megalm.ops import _backend  # noqa: E402

GOALS = {"norm_swiglu_rope_pct_of_hbm_peak": 80.0, "fused_ce_speedup_vs_eager": 2.0,
         "fused_ce_peak_memory_ratio_max": 0.2}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_hbm_bytes_per_s() -> float | None:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    table = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
    return next((v for k, v in table.items() if k in torch.cuda.get_device_name()), None)


def bench(fn: Callable[[], None], iters: int) -> float:
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


def fwd_bwd(op: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """One forward + backward; upstream grads (ones) are made once, outside the timed work."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    dys: list[torch.Tensor] = []

    def run():
        for t in leaves:
            t.grad = None
        y = op(*leaves)
        y = y if isinstance(y, tuple) else (y,)
        if not dys:
            dys.extend(torch.ones_like(o) for o in y)
        torch.autograd.backward(y, dys)
    return run


def measured_copy_bytes_per_s(iters: int) -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), iters)
    return 2 * x.numel() / t


def op_cases(dtype: torch.dtype):
    """(name, bytes moved, {variant: op}, inputs) at sizes of a 7B-class model step."""
    dev, el = "cuda", torch.tensor([], dtype=dtype).element_size()
    r, d = 16384, 4096
    x = torch.randn(r, d, device=dev, dtype=dtype)
    w = torch.rand(d, device=dev, dtype=dtype) + 0.5
    b = torch.randn(d, device=dev, dtype=dtype)
    yield (f"rms_norm {r}x{d}", 5 * x.numel() * el,
           {"ours": lambda a, ww: rms_norm(a, ww, backend="cuda"),
            "eager": lambda a, ww: rms_norm(a, ww, backend="reference"),
            "torch_op": lambda a, ww: F.rms_norm(a, (d,), ww, 1e-5)}, [x, w])
    yield (f"layer_norm {r}x{d}", 5 * x.numel() * el,
           {"ours": lambda a, ww, bb: layer_norm(a, ww, bb, backend="cuda"),
            "eager": lambda a, ww, bb: layer_norm(a, ww, bb, backend="reference"),
            "torch_op": lambda a, ww, bb: F.layer_norm(a, (d,), ww, bb)}, [x, w, b])
    xa = x.view(8, r // 8, d)
    sh, sc = torch.randn(8, d, device=dev, dtype=dtype), torch.randn(8, d, device=dev, dtype=dtype)
    yield (f"adaln 8x{r // 8}x{d}", 5 * x.numel() * el,
           {"ours": lambda a, s, c: adaln_layer_norm(a, s, c, backend="cuda"),
            "eager": lambda a, s, c: adaln_layer_norm(a, s, c, backend="reference")}, [xa, sh, sc])
    del x
    bsz, t, hq, hk, hd = 8, 2048, 32, 8, 128
    q = torch.randn(bsz, t, hq, hd, device=dev, dtype=dtype)
    k = torch.randn(bsz, t, hk, hd, device=dev, dtype=dtype)
    cos, sin = rope_cos_sin(torch.arange(t, device=dev), hd)
    yield (f"rope q {bsz}x{t}x{hq}x{hd} k {hk} heads", 4 * (q.numel() + k.numel()) * el,
           {"ours": lambda a, c: apply_rope(a, c, cos, sin, backend="cuda"),
            "eager": lambda a, c: apply_rope(a, c, cos, sin, backend="reference")}, [q, k])
    del q, k
    gt = torch.randn(r, 11008, device=dev, dtype=dtype)
    up = torch.randn_like(gt)
    yield (f"swiglu {r}x11008", 8 * gt.numel() * el,
           {"ours": lambda a, u: swiglu(a, u, backend="cuda"),
            "eager": lambda a, u: swiglu(a, u, backend="reference"),
            "torch_op": lambda a, u: F.silu(a) * u}, [gt, up])
    del gt, up
    v = 32000
    logits = torch.randn(8192, v, device=dev, dtype=dtype)
    labels = torch.randint(0, v, (8192,), device=dev)
    yield (f"cross_entropy 8192x{v}", 5 * logits.numel() * el,
           {"ours": lambda a: cross_entropy(a, labels, backend="cuda"),
            "eager": lambda a: cross_entropy(a, labels, backend="reference"),
            "torch_op": lambda a: F.cross_entropy(a.float(), labels)}, [logits])


def run_ops(dtypes, iters: int, compile_dtype, peak, copy_bw) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for name, nbytes, variants, inputs in op_cases(dtype):
            if dtype == compile_dtype:
                variants["torch_compile"] = torch.compile(variants["eager"])
            times, errors = {}, {}
            for key, op in variants.items():
                try:
                    times[key] = bench(fwd_bwd(op, inputs), iters)
                except Exception as exc:  # noqa: BLE001 — a failing baseline is reported, not fatal
                    errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ours = times["ours"]
            row = {"op": name, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
                   "seconds": {k: round(s, 7) for k, s in times.items()},
                   "gb_per_s": round(nbytes / ours / 1e9, 1),
                   "pct_of_measured_copy": round(100 * nbytes / ours / copy_bw, 1)}
            if peak:
                row["pct_of_hbm_peak"] = round(100 * nbytes / ours / peak, 1)
            for k, s in times.items():
                if k != "ours":
                    row[f"speedup_vs_{k}"] = round(s / ours, 2)
            if errors:
                row["errors"] = errors
            log(json.dumps(row))
            rows.append(row)
            del inputs, variants
            torch.cuda.empty_cache()
    return rows


def lm_head_loss(iters: int) -> dict:
    """Vocab 128k, 8k tokens, hidden 4096, bf16: fused linear CE vs logits + F.cross_entropy."""
    v, n, d, dev, bf = 128 * 1024, 8192, 4096, "cuda", torch.bfloat16
    h = torch.randn(n, d, device=dev, dtype=bf) * 0.1
    w = torch.randn(v, d, device=dev, dtype=bf) * 0.02
    lab = torch.randint(0, v, (n,), device=dev)
    out = {"vocab": v, "tokens": n, "hidden": d, "dtype": "bfloat16"}
    for name, fn in [("fused_linear_ce", lambda a, b_: fused_linear_cross_entropy(a, b_, lab)),
                     ("eager_matmul_then_ce", lambda a, b_: F.cross_entropy((a @ b_.t()).float(), lab))]:
        run = fwd_bwd(fn, [h, w])
        run()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        out[name] = {"peak_extra_bytes": peak, "seconds": round(bench(run, iters), 5)}
        torch.cuda.empty_cache()
    out["peak_memory_ratio"] = round(out["fused_linear_ce"]["peak_extra_bytes"] /
                                     out["eager_matmul_then_ce"]["peak_extra_bytes"], 4)
    out["speedup_vs_eager"] = round(out["eager_matmul_then_ce"]["seconds"] /
                                    out["fused_linear_ce"]["seconds"], 2)
    return out


def adamw(iters: int) -> dict:
    """A 1.2B-parameter-like mix of tensors, fp32 params (same state bytes for every optimizer)."""
    shapes = [(4096, 4096)] * 24 + [(11008, 4096)] * 12 + [(4096,)] * 48
    n_params = sum(torch.Size(s).numel() for s in shapes)
    times = {}
    for name, make in [
        ("ours", lambda ps: FusedAdamW(ps, lr=1e-4, weight_decay=0.1, backend="cuda")),
        ("torch_foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True)),
        ("torch_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True)),
    ]:
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = make(ps)
        times[name] = bench(opt.step, iters)
        del ps, opt
        torch.cuda.empty_cache()
    nbytes = 7 * 4 * n_params  # read p, g, m, v; write p, m, v
    return {"params": n_params, "bytes": nbytes, "seconds": {k: round(v, 6) for k, v in times.items()},
            "gb_per_s": round(nbytes / times["ours"] / 1e9, 1),
            "speedup_vs_torch_foreach": round(times["torch_foreach"] / times["ours"], 2),
            "speedup_vs_torch_fused": round(times["torch_fused"] / times["ours"], 2)}


def newton_schulz_times(iters: int) -> list[dict]:
    """Muon's orthogonalisation per matrix: ours (fused norm/cast + epilogue-fused GEMMs) vs the
    eager reference (the same GEMMs plus 5 elementwise kernels per iteration), fp32 gradient in."""
    rows = []
    for shape in [(768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096)]:
        g = torch.randn(*shape, device="cuda")
        times = {k: bench(lambda k=k: newton_schulz(g, backend=k), iters) for k in ("cuda", "reference")}
        rows.append({"op": f"newton_schulz {shape[0]}x{shape[1]}", "ours_ms": round(times["cuda"] * 1e3, 4),
                     "eager_ms": round(times["reference"] * 1e3, 4),
                     "speedup_vs_eager": round(times["reference"] / times["cuda"], 3)})
        log(json.dumps(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/ops.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if _backend.extension() is None:
        print(f"error: CUDA kernels not available: {_backend.unavailable_reason()}", file=sys.stderr)
        return 2
    peak, copy_bw = peak_hbm_bytes_per_s(), measured_copy_bytes_per_s(args.iters)
    rows = run_ops([torch.bfloat16, torch.float32], args.iters,
                   None if args.no_compile else torch.bfloat16, peak, copy_bw)
    head = lm_head_loss(max(5, args.iters // 3))
    log(json.dumps(head))
    adam = adamw(max(5, args.iters // 3))
    log(json.dumps(adam))
    ns = newton_schulz_times(max(5, args.iters // 3))
    bw_ops = [r for r in rows if r["op"].split()[0] in ("rms_norm", "layer_norm", "swiglu", "rope")]
    goals = {
        "norm_swiglu_rope_min_pct_of_hbm_peak": min((r.get("pct_of_hbm_peak", 0) for r in bw_ops),
                                                    default=None),
        "fused_ce_speedup_vs_eager": head["speedup_vs_eager"],
        "fused_ce_peak_memory_ratio": head["peak_memory_ratio"],
    }
    goals["met"] = {
        "bandwidth_80pct": (goals["norm_swiglu_rope_min_pct_of_hbm_peak"] or 0)
        >= GOALS["norm_swiglu_rope_pct_of_hbm_peak"],
        "ce_2x_faster": head["speedup_vs_eager"] >= GOALS["fused_ce_speedup_vs_eager"],
        "ce_5x_less_memory": head["peak_memory_ratio"] <= GOALS["fused_ce_peak_memory_ratio_max"],
    }
    name = torch.cuda.get_device_name()
    result = {
        "benchmark": "megalm.ops fused CUDA kernels, forward + backward",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": name, "hbm_peak_bytes_per_s": peak, "measured_copy_bytes_per_s": round(copy_bw),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "ops": rows, "lm_head_loss_vocab128k": head, "adamw": adam,
        "newton_schulz": ns, "goals": goals,
    }
    text = json.dumps(result, indent=2)
    print(text)
    tag = "".join(c if c.isalnum() else "_" for c in name.split()[-1].lower())
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"ops_{tag}.json")
    atomic_write(out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
