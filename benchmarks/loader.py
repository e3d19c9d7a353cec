#!/usr/bin/env python
"""Data loader benchmark: start-up over ~1B tokens of shards, and packed tokens/s per rank.

    python benchmarks/loader.py [--tokens 1e9] [--shards 4] [--seq-len 2048] [--out benchmarks/results/loader.json]

Writes shards (uint16, documents of 16..4096 tokens) to a temp dir, deletes them afterwards.
Baselines from the same run:
- start-up: the same loader with verify=True (sha256 of every byte: what a full scan costs);
- throughput: a naive packer (python lists, one document at a time, per-token doc/position ids).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.data import IGNORE_INDEX, DataConfig, build_loader, load_manifest, open_split  # noqa: E402
from tests.data.shards import EOS_ID, write_manifest, write_shard_file  # noqa: E402

VOCAB = 32000


def make_shards(out: str, total_tokens: int, n_shards: int, seed: int, doc_len: tuple[int, int] = (16, 4096)) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    tok = os.path.join(out, "tokenizer.model")
    with open(tok, "wb") as f:
        f.write(b"benchmark stand-in tokenizer")
    import hashlib

    tok_sha = hashlib.sha256(open(tok, "rb").read()).hexdigest()
    per = total_tokens // n_shards
    shards, n_docs = [], 0
    for s in tqdm(range(n_shards), desc="writing shards", unit="shard"):
        mean = (doc_len[0] + doc_len[1]) / 2
        lengths = rng.integers(doc_len[0], doc_len[1] + 1, size=int(per / mean * 1.05) + 64)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), per)) + 1]
        lengths[-1] -= int(lengths.sum()) - per  # exactly `per` tokens per shard
        lengths = lengths[lengths > 0]
        values = rng.integers(EOS_ID + 1, VOCAB, size=per, dtype=np.uint16)
        shards.append(write_shard_file(os.path.join(out, f"train-{s:05d}.arrow"), lengths, values, batch_rows=8192))
        n_docs += len(lengths)
        del values
    split = {"documents": n_docs, "tokens": per * n_shards, "shards": shards}
    write_manifest(out, {"train": split}, VOCAB, EOS_ID, "uint16", tok_sha)
    return per * n_shards, n_docs


def time_startup(cfg: DataConfig) -> float:
    t0 = time.perf_counter()
    loader = build_loader(cfg, global_batch=8, micro_batch=8)
    next(loader)  # includes the first epoch's document and sample permutations
    return time.perf_counter() - t0


def our_throughput(cfg: DataConfig, steps: int, global_batch: int, micro_batch: int) -> float:
    loader = build_loader(cfg, global_batch=global_batch, micro_batch=micro_batch)
    loader.skip(1000)  # a random place in the epoch, not the first pages touched at start-up
    n = 0
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="packed loader", unit="step", leave=False):
        for mb in next(loader):
            n += mb["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def naive_throughput(shard_dir: str, seq_len: int, micro_batch: int, min_tokens: int) -> float:
    """One document at a time into a python list; windows with per-token python ids."""
    docs = open_split(load_manifest(shard_dir), "train")
    buf: list[int] = []
    doc: list[int] = []
    pos: list[int] = []
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    n = 0
    g = 0
    t0 = time.perf_counter()
    while n < min_tokens:
        toks = docs.doc(g).tolist() + [EOS_ID]
        buf += toks
        doc += [g] * len(toks)
        pos += list(range(len(toks)))
        g += 1
        while len(buf) >= seq_len + 1:
            w, d = buf[: seq_len + 1], doc[: seq_len + 1]
            first = d[0]
            p = [pp - pos[0] if dd == first else pp for pp, dd in zip(pos[: seq_len + 1], d)]
            local = {}
            ids = [local.setdefault(x, len(local)) for x in d]
            labels = [w[t + 1] if d[t] == d[t + 1] else IGNORE_INDEX for t in range(seq_len)]
            rows.append((w[:-1], labels, p[:-1], ids[:-1]))
            del buf[:seq_len], doc[:seq_len], pos[:seq_len]
            if len(rows) == micro_batch:
                batch = [torch.tensor([r[i] for r in rows], dtype=torch.int64) for i in range(4)]
                n += batch[0].numel()
                rows = []
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short-doc-tokens", type=float, default=2e8, help="second data set: documents of 20..180 tokens")
    ap.add_argument("--workdir", default=None, help="where to write the temporary shards (default: system temp)")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="megalm-loader-bench-", dir=args.workdir)
    try:
        t0 = time.perf_counter()
        total, n_docs = make_shards(os.path.join(tmp, "shards"), int(args.tokens), args.shards, seed=0)
        write_s = time.perf_counter() - t0
        cfg = DataConfig(paths=[os.path.join(tmp, "shards")], seq_len=args.seq_len, seed=1)
        startup = [time_startup(cfg) for _ in range(args.repeats)]
        verify_startup = time_startup(DataConfig(paths=cfg.paths, seq_len=args.seq_len, seed=1, verify=True))
        ours = [our_throughput(cfg, args.steps, args.global_batch, args.micro_batch) for _ in range(args.repeats)]
        naive = [naive_throughput(cfg.paths[0], args.seq_len, args.micro_batch, 2_000_000) for _ in range(args.repeats)]
        shutil.rmtree(os.path.join(tmp, "shards"))
        # many short documents: start-up scales with documents, packing with documents per window
        s_total, s_docs = make_shards(os.path.join(tmp, "short"), int(args.short_doc_tokens), 2, seed=1, doc_len=(20, 180))
        s_cfg = DataConfig(paths=[os.path.join(tmp, "short")], seq_len=args.seq_len, seed=1)
        s_startup = [time_startup(s_cfg) for _ in range(args.repeats)]
        s_ours = [our_throughput(s_cfg, args.steps, args.global_batch, args.micro_batch) for _ in range(args.repeats)]
        s_naive = [naive_throughput(s_cfg.paths[0], args.seq_len, args.micro_batch, 2_000_000) for _ in range(args.repeats)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    best_ours, best_naive = max(ours), max(naive)
    result = {
        "benchmark": "megalm.data loader",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
            "note": "shared 2-core machine: other jobs ran alongside; shards in the page cache (just written)",
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "torch": torch.__version__,
        },
        "data": {"tokens": total, "documents": n_docs, "shards": args.shards, "dtype": "uint16", "write_s": round(write_s, 2)},
        "startup_s": [round(x, 4) for x in startup],
        "startup_s_best": round(min(startup), 4),
        "startup_goal_s": 2.0,
        "startup_verify_sha256_s": round(verify_startup, 3),
        "startup_speedup_vs_verify_full_read": round(verify_startup / min(startup), 1),
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "packed_tokens_per_s_per_rank": [round(x) for x in ours],
        "packed_tokens_per_s_per_rank_best": round(best_ours),
        "packed_tokens_per_s_goal": 10_000_000,
        "naive_python_packing_tokens_per_s": [round(x) for x in naive],
        "speedup_vs_naive_python_packing": round(best_ours / best_naive, 1),
        "short_docs": {
            "tokens": s_total,
            "documents": s_docs,
            "doc_len_range": [20, 180],
            "startup_s": [round(x, 4) for x in s_startup],
            "packed_tokens_per_s_per_rank": [round(x) for x in s_ours],
            "naive_python_packing_tokens_per_s": [round(x) for x in s_naive],
            "speedup_vs_naive_python_packing": round(max(s_ours) / max(s_naive), 1),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_out, args.out)
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
