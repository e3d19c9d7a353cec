#!/usr/bin/env python
"""Training throughput on CPU: `megalm train` (1 rank, DeepSpeed, packed documents with document
masks, fused CE, FusedAdamW) vs a plain nanoGPT-style PyTorch loop written here (same model shape,
batch, sequence length, grad accumulation and clipping; causal attention, full-logits CE,
torch.optim.AdamW), measured in the same run.

    python benchmarks/train_cpu.py [--steps 40] [--out benchmarks/results/train_cpu.json]

Prints JSON: raw tokens/s of both and `speedup_vs_plain_pytorch`.
"""

from __future__ import annotations

import argparse
import statistics
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden=352)  # configs/models/tiny.yaml
SEQ, MICRO, GLOBAL, LR = 128, 8, 16, 3e-3


# ---- the plain baseline (nanoGPT-style, self-contained) ------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d, h, kv, hidden):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.wq, self.wk = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.wv, self.wo = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=False)
        self.w1, self.w2, self.w3 = (nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False),
                                     nn.Linear(d, hidden, bias=False))

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        y = self.n1(x)
        q = rope(self.wq(y).view(B, T, self.h, self.hd), cos, sin).transpose(1, 2)
        k = rope(self.wk(y).view(B, T, self.kv, self.hd), cos, sin).transpose(1, 2)
        v = self.wv(y).view(B, T, self.kv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, D))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class GPT(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        hd = dim // n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(SEQ).float(), inv)[None, :, None, :]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        logits = F.linear(self.norm(x), self.emb.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def plain_tokens_per_s(shards: str, vocab: int, steps: int, warmup: int) -> float:
    import pyarrow as pa

    data = np.concatenate([pa.ipc.open_file(str(f)).read_all().column("tokens").combine_chunks()
                           .flatten().to_numpy().astype(np.int64) for f in sorted(Path(shards).glob("train-*.arrow"))])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = GPT(vocab, **SHAPE)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    accum = GLOBAL // MICRO
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        for _ in range(accum):
            ix = rng.integers(0, len(data) - SEQ - 1, size=MICRO)
            x = torch.from_numpy(np.stack([data[i:i + SEQ] for i in ix]))
            y = torch.from_numpy(np.stack([data[i + 1:i + 1 + SEQ] for i in ix]))
            (model(x, y) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) * GLOBAL * SEQ / (time.perf_counter() - t0)


# ---- megalm train, 1 rank ---------------------------------------------------------------------------
def megalm_tokens_per_s(shards: str, work: str, steps: int, warmup: int) -> float:
    overrides = [f"data.paths=[{shards}]", f"data.seq_len={SEQ}", f"batch.micro_batch={MICRO}",
                 f"batch.global_batch={GLOBAL}", f"train.steps={steps}", f"optimizer.lr={LR}",
                 "parallel.zero_stage=0", "precision.dtype=fp32", "logging.interval=1", "logging.progress=false",
                 "eval.batches=0", f"checkpoint.interval={steps + 1}"]
    os.makedirs(work, exist_ok=True)
    cfg = Path(work) / "bench.yaml"
    cfg.write_text("name: bench\nmodel: tiny\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "train", str(cfg), *overrides, "--resume", "none"],
                          cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    recs = [json.loads(line) for line in (Path(work) / "runs/bench/metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train" and r["step"] > warmup]
    # Per-step rates -> total tokens over total time (the harmonic mean), same as the baseline.
    seconds = sum(GLOBAL * SEQ / r["tokens_per_s"] for r in recs)
    return len(recs) * GLOBAL * SEQ / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating megalm/plain runs; medians reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (1 resists contention)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    from tests.distributed.corpus import make_corpus

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the megalm subprocess too
    ours_runs, base_runs = [], []
    with tempfile.TemporaryDirectory() as work:
        shards = make_corpus(os.path.join(work, "shards"), vocab_size=2000, n_docs=2000)
        vocab = json.loads(Path(shards, "manifest.json").read_text())["tokenizer"]["vocab_size"]
        # Alternate the two so a shared machine's load hits both alike; report medians.
        for r in range(args.rounds):
            ours_runs.append(megalm_tokens_per_s(shards, os.path.join(work, f"r{r}"), args.steps, args.warmup))
            base_runs.append(plain_tokens_per_s(shards, vocab, args.steps, args.warmup))
    ours, base = statistics.median(ours_runs), statistics.median(base_runs)
    result = {
        "benchmark": "train_cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": {"preset": "tiny", **SHAPE, "vocab": vocab}, "seq_len": SEQ, "micro_batch": MICRO,
        "global_batch": GLOBAL, "timed_steps": args.steps - args.warmup,
        "megalm_train_tokens_per_s": round(ours, 1), "plain_pytorch_tokens_per_s": round(base, 1),
        "megalm_runs_tokens_per_s": [round(x, 1) for x in ours_runs],
        "plain_runs_tokens_per_s": [round(x, 1) for x in base_runs],
        "speedup_vs_plain_pytorch": round(ours / base, 3),
        "note": "megalm also applies document masks (attention never crosses packed documents); "
                "the baseline uses plain causal attention over random windows",
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from megalm.fsio import atomic_write

        atomic_write(args.out, text + "\n")
    assert math.isfinite(ours) and math.isfinite(base)


if __name__ == "__main__":
    main()
