#!/usr/bin/env python
"""How long a checkpoint save blocks the training loop: async vs sync, GPT-2 124M with Adam state.

  DS_ACCELERATOR=cpu python benchmarks/checkpoint.py [--repeats 3] [--zero 1] [--out FILE]

1 rank, DeepSpeed on CPU (gloo). One real optimizer step creates the Adam state, then each
variant saves `repeats` times into a scratch directory:
  - deepspeed_stock: engine.save_checkpoint with DeepSpeed's own engine (no hashing, no fsync,
    no atomic publish): the same-run baseline;
  - sync: DeepSpeedCheckpointManager(async_save=False): write + sha256 + fsync + publish, all blocking;
  - async: DeepSpeedCheckpointManager(async_save=True): blocked only for the copy into CPU memory; the
    write + publish time (save -> wait) is reported beside it.
The previous async save is waited for before the next one starts, as in a loop whose checkpoint
interval is longer than a write. Prints JSON; --out also writes it there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _env() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def build(zero: int):
    import deepspeed
    import torch

    from megalm.models.llm import LLM
    from megalm.models.presets import load_preset

    torch.manual_seed(0)
    model = LLM(load_preset("gpt2-124m"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ids = torch.randint(0, 50257, (1, 32))
    loss = engine(ids, labels=ids)
    engine.backward(loss)
    engine.step()
    return engine, sum(p.numel() for p in model.parameters())


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    _env()
    from tqdm import tqdm

    from megalm.checkpoint.config import CheckpointConfig
    from megalm.engine.checkpointing import DeepSpeedCheckpointManager

    engine, n_params = build(args.zero)
    stock_engine = engine.checkpoint_engine
    scratch = args.dir or tempfile.mkdtemp(prefix="megalm-ckpt-bench-")
    res: dict = {"benchmark": "checkpoint_blocked_time", "model": "gpt2-124m", "params": n_params,
                 "zero_stage": args.zero, "ranks": 1, "device": "cpu", "host_cpus": os.cpu_count(),
                 "python": platform.python_version(), "repeats": args.repeats,
                 "deepspeed_stock_blocked_s": [], "sync_blocked_s": [], "async_blocked_s": [],
                 "async_write_and_publish_s": []}
    bar = tqdm(total=3 * args.repeats, desc="saves")
    for i in range(args.repeats):
        engine.checkpoint_engine = stock_engine
        t0 = time.perf_counter()
        engine.save_checkpoint(os.path.join(scratch, "stock"), tag=f"s{i}", save_latest=False)
        res["deepspeed_stock_blocked_s"].append(time.perf_counter() - t0)
        res["checkpoint_bytes"] = du(os.path.join(scratch, "stock", f"s{i}"))
        shutil.rmtree(os.path.join(scratch, "stock"))
        bar.update()
    for mode in ("sync", "async"):
        mgr = DeepSpeedCheckpointManager(CheckpointConfig(dir=os.path.join(scratch, mode), keep_last=1,
                                                 async_save=mode == "async"), rank=0, world_size=1)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            mgr.save(engine, i + 1, {"step": i + 1})
            res[f"{mode}_blocked_s"].append(mgr.last_blocked_s)
            mgr.wait()
            if mode == "async":
                res["async_write_and_publish_s"].append(time.perf_counter() - t0 - mgr.last_blocked_s)
            bar.update()
        mgr.close()
        shutil.rmtree(os.path.join(scratch, mode))
    bar.close()
    med = {k: statistics.median(res[k]) for k in ("deepspeed_stock_blocked_s", "sync_blocked_s", "async_blocked_s")}
    res["median_s"] = med
    res["async_blocked_ratio"] = med["async_blocked_s"] / med["sync_blocked_s"]  # goal <= 0.10
    res["speedup_vs_sync"] = med["sync_blocked_s"] / med["async_blocked_s"]
    res["speedup_vs_deepspeed_stock"] = med["deepspeed_stock_blocked_s"] / med["async_blocked_s"]
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
