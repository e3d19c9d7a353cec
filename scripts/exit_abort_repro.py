#!/usr/bin/env python
"""Reproduces the exit-time abort of gloo ranks ("terminate called without an active exception",
SIGABRT after all work is done and the process group destroyed), for whoever hunts its cause.

    python scripts/exit_abort_repro.py [RUNS] [sp] [grads] [exit]

Each run spawns 2 gloo ranks that train one step of a tiny LLM in fp64 and exit. Measured on the
2-core CPU machine (2026-12-06, torch 2.13.0+cpu, DeepSpeed 0.19.8): with `sp grads` (Ulysses
sequence parallelism's all-to-alls in the backward, then one all-reduce per gradient) 1 to 3 of 20
runs aborted; with only one of the two, 0 of 20. `exit`: leave with os._exit(0) right after
destroy_process_group (as `megalm train` does), to tell an abort inside it from one in the
interpreter's teardown. tests/train/test_sequence.py leaves its workers with os._exit(0) once their
results are written because of this.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(rank: int, world: int, port: int, flags: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from megalm.engine.runtime import init_distributed
    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM
    from megalm.train.sequence import SequenceParallel

    init_distributed()
    model = LLM(LLMConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                          max_seq_len=64)).double()
    ids = torch.randint(0, 61, (2, 16))
    if "sp" in flags:
        SequenceParallel(model, dist.group.WORLD)
        model(ids, labels=ids).backward()
    else:
        model(ids, None, None, ids).backward()
    if "grads" in flags:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    dist.barrier()
    dist.destroy_process_group()
    if "exit" in flags:
        sys.stdout.flush()
        os._exit(0)


def main() -> None:
    from launcher.env import free_port

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    flags = sys.argv[2:]
    aborted = 0
    for _ in range(runs):
        try:
            mp.spawn(run, args=(2, free_port(), flags), nprocs=2, join=True)
        except mp.ProcessExitedException:
            aborted += 1
    print(f"{aborted} of {runs} runs had a rank abort at exit (flags: {' '.join(flags) or 'none'})")


if __name__ == "__main__":
    main()
