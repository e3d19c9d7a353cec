#!/usr/bin/env python
"""What Muon's Newton–Schulz costs on a CPU at the tiny recipe's widths (configs/recipe-tiny.yaml:
the `tiny` shape, dim 128, 4 layers; micro-batch 8 x 128 tokens; global batch 32 on 2 ranks, so
2 micro-batches per rank per step).

Per optimizer step, one rank orthogonalises every hidden matrix (DeepSpeed's ZeRO-1/2 run Muon
on the whole reduced gradient; a matrix split across ranks is orthogonalised on both). Timed,
in one process with OMP_NUM_THREADS=1 (each of the 2 ranks owns one core):
  ours      megalm.ops.newton_schulz as Muon calls it on CPU (the eager bf16 reference),
  ds_gram   what megalm's Muon ran before it routed to megalm's op: DeepSpeed's torch.compiled
            Gram Newton–Schulz (fp32 on a CPU),
  step      the forward + backward of the 2 micro-batches one rank computes per step.
Medians over rounds; prints JSON (`ns_share_of_step`, `speedup_vs_deepspeed_gram`), `--out` writes it.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python benchmarks/newton_schulz_cpu.py --out benchmarks/results/newton_schulz_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.fsio import atomic_write  # noqa: E402
from megalm.models.llm import LLM  # noqa: E402
from megalm.ops import newton_schulz  # noqa: E402
from megalm.train.config import load_config  # noqa: E402
from megalm.train.muon import hidden_matrices  # noqa: E402
from megalm.models.presets import load_preset  # noqa: E402


def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up (and torch.compile's first trace)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config("recipe-tiny", ["data.paths=[unused]"], world_size=2)
    torch.manual_seed(0)
    # The recipe's model on the tiny preset's own vocabulary (the run would take the tokenizer's).
    model = LLM(load_preset(cfg.model["preset"], {k: v for k, v in cfg.model.items() if k != "preset"}))
    hidden = hidden_matrices(model)
    grads = [torch.randn(p.shape) for p in model.parameters() if id(p) in hidden]

    from deepspeed.runtime.zero.muon.original_muon import zeropower_via_gram_newtonschulz

    ours = median_seconds(lambda: [newton_schulz(g) for g in grads], args.rounds)
    gram = median_seconds(lambda: [zeropower_via_gram_newtonschulz(g, 5) for g in grads], args.rounds)

    mb, seq = cfg.batch.micro_batch, cfg.data.seq_len
    per_rank = cfg.batch.global_batch // (mb * 2)
    ids = torch.randint(0, model.config.vocab_size, (mb, seq))

    def fwd_bwd():
        for _ in range(per_rank):
            model(ids, labels=ids).backward()

    step = median_seconds(fwd_bwd, max(3, args.rounds // 3))
    result = {
        "benchmark": "Newton-Schulz per Muon step on CPU at recipe-tiny widths, one rank, 1 thread",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": {"dim": model.config.dim, "n_layers": model.config.n_layers,
                  "hidden_matrices": [list(g.shape) for g in grads]},
        "seconds": {"ours": round(ours, 6), "ds_gram": round(gram, 6), "step_fwd_bwd": round(step, 6)},
        "ns_share_of_step": round(ours / (ours + step), 4),
        "speedup_vs_deepspeed_gram": round(gram / ours, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
