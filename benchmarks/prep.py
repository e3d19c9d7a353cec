"""Throughput of `megalm prep` vs a Megatron-LM `tools/preprocess_data.py`-style baseline.

Corpora: the whole `builtin:python-docs` corpus written as JSONL (~3 MB on Python 3.11: far
less than the ~20 MB once estimated), and that file repeated to ~20 MB. Repetition favours our
word cache (every word is known after the first copy), so both are reported: read "x1" as the
fresh-vocabulary figure. Tokenizer: an 8k BPE trained on the first 6,000 documents (fixed).
Baseline (written here, same idea as Megatron's script): json.loads per line and
`SentencePieceProcessor.encode` per document in a multiprocessing Pool of 2, int32 arrays
appended to a .bin file plus a sizes index.
Rounds interleave baseline / 1 worker / 2 workers so machine noise hits all alike; the median
of the rounds is reported, as wall seconds and as CPU seconds (self + pool workers). On a
shared machine (Linux autogroup: all processes of one session share one fair share) extra
workers cannot get extra CPU, so the wall-clock speedup there reflects CPU work per token;
`cpu_work_ratio` = baseline CPU seconds / ours. Prints JSON; `--out FILE` also writes it.

    .venv/bin/python benchmarks/prep.py --out benchmarks/results/prep.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow
import sentencepiece as spm

from data_prep import tokenizer
from data_prep.builtin import iter_python_docs, write_python_docs_jsonl
from data_prep.config import PrepConfig
from data_prep.pipeline import run
from megalm.fsio import atomic_write

_sp = None


def _baseline_init(model_file: str) -> None:
    global _sp  # one processor per pool worker, as Megatron's Encoder.initializer does
    _sp = spm.SentencePieceProcessor(model_file=model_file)


def _baseline_encode(line: str) -> tuple[list[int], int]:
    text = json.loads(line)["text"]
    return _sp.encode(text), len(line)


def megatron_baseline(corpus: Path, model_file: Path, out_prefix: Path, workers: int = 2) -> int:
    """Returns the number of tokens written."""
    tokens, sizes = 0, []
    with open(corpus, encoding="utf-8") as fin, open(f"{out_prefix}.bin", "wb") as fbin:
        with mp.get_context("fork").Pool(workers, _baseline_init, (str(model_file),)) as pool:
            for ids, _ in pool.imap(_baseline_encode, fin, chunksize=32):
                fbin.write(np.array(ids, dtype=np.int32).tobytes())
                sizes.append(len(ids))
                tokens += len(ids)
    np.array(sizes, dtype=np.int64).tofile(f"{out_prefix}.idx")
    return tokens


def ours(corpus: Path, model_file: Path, out: Path, workers: int, shard_mb: float) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        m = run(PrepConfig(inputs=(str(corpus),), output=str(out), tokenizer=str(model_file),
                           workers=workers, shard_size_mb=shard_mb, valid_fraction=0.005))
    return m["stats"]["tokens"]


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench(corpus: Path, model_file: Path, work: Path, rounds: int, shard_mb: float) -> dict:
    times: dict[str, list[float]] = {"baseline": [], "ours_1w": [], "ours_2w": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name in times:
            out = work / f"{name}-{r}"
            out.mkdir()
            t, c = time.perf_counter(), _cpu_seconds()
            if name == "baseline":
                tokens[name] = megatron_baseline(corpus, model_file, out / "data", 2)
            else:
                tokens[name] = ours(corpus, model_file, out, int(name[-2]), shard_mb)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu_seconds() - c)
            shutil.rmtree(out)
            print(f"{corpus.name} round {r} {name}: {times[name][-1]:.2f}s", file=sys.stderr)
    size = corpus.stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"jsonl_bytes": size,
              "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
              "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
              "tokens": tokens}
    for name in times:
        result[name] = {"median_seconds": round(med[name], 3),
                        "tokens_per_s": round(tokens[name] / med[name]),
                        "mb_per_s": round(size / med[name] / 1e6, 2)}
        result[name]["median_cpu_seconds"] = round(statistics.median(cpu[name]), 3)
        if name != "baseline":
            result[name]["speedup_vs_megatron_baseline"] = round(med["baseline"] / med[name], 2)
            # CPU work per token: what wall time becomes on an otherwise idle machine.
            result[name]["cpu_work_ratio"] = round(
                statistics.median(cpu["baseline"]) / statistics.median(cpu[name]), 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--shard-size-mb", type=float, default=0.25,
                    help="small enough that the corpus makes several work units")
    ap.add_argument("--target-mb", type=float, default=20.0, help="size of the repeated corpus")
    ap.add_argument("--out")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    try:
        corpus = work / "corpus.jsonl"
        n_docs = write_python_docs_jsonl(corpus)
        size = corpus.stat().st_size
        t = time.perf_counter()
        first = itertools.islice(iter_python_docs(), 6000)
        lines = (ln for d in first for ln in d.splitlines() if ln.strip())
        model = tokenizer.train(lines, tokenizer.TokenizerSpec(vocab_size=args.vocab_size))
        train_s = time.perf_counter() - t
        model_file = work / "bpe8k.model"
        model_file.write_bytes(model)

        copies = max(1, round(args.target_mb * 1e6 / size))
        big = work / f"corpus-x{copies}.jsonl"
        with open(big, "wb") as f:
            for _ in range(copies):
                f.write(corpus.read_bytes())
        result = {
            "benchmark": "prep",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
            "versions": {"sentencepiece": spm.__version__, "pyarrow": pyarrow.__version__,
                         "numpy": np.__version__},
            "corpus": {"name": "builtin:python-docs", "documents": n_docs, "jsonl_bytes": size},
            "tokenizer": {"type": "bpe", "vocab_size": args.vocab_size,
                          "train_seconds": round(train_s, 2)},
            "shard_size_mb": args.shard_size_mb,
            "rounds": args.rounds,
            "baseline": "Megatron-style: json.loads + encode per document, Pool(2), int32 .bin",
            "x1": bench(corpus, model_file, work, args.rounds, args.shard_size_mb),
            f"x{copies}": bench(big, model_file, work, args.rounds, args.shard_size_mb),
        }
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            atomic_write(args.out, text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
