"""Print the unigram entropy (nats/token) of a shard dir's split: the loss of a model that
ignores context. The demo compares the trained model's eval loss against it."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa


def unigram_entropy(shard_dir: str, split: str = "train") -> float:
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        manifest = json.load(f)
    vocab = manifest["tokenizer"]["vocab_size"]
    eos = manifest["tokenizer"]["eos_id"]
    counts = np.zeros(vocab, dtype=np.int64)
    docs = 0
    for shard in manifest["splits"][split]["shards"]:
        with pa.memory_map(os.path.join(shard_dir, shard["file"])) as mm:
            table = pa.ipc.open_file(mm).read_all()
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        counts += np.bincount(flat, minlength=vocab)
        docs += table.num_rows
    counts[eos] += docs  # the packed stream has one EOS after every document
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shard_dir")
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    print(f"{unigram_entropy(args.shard_dir, args.split):.4f}")


if __name__ == "__main__":
    main()
