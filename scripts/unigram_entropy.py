"""Unigram baselines (nats/token) for a shard dir: the loss of a model that ignores context.

`megalm.data` packs one EOS after every document, so EOS is counted once per document here too.
The demo compares the trained model's eval loss (on the valid split) against the cross-entropy of
the valid split under the train split's unigram distribution: the same tokens, scored by the best
context-free model fitted on the training data.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa


def token_counts(shard_dir: str, split: str) -> np.ndarray:
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        manifest = json.load(f)
    vocab = manifest["tokenizer"]["vocab_size"]
    counts = np.zeros(vocab, dtype=np.int64)
    docs = 0
    for shard in manifest["splits"][split]["shards"]:
        with pa.memory_map(os.path.join(shard_dir, shard["file"])) as mm:
            table = pa.ipc.open_file(mm).read_all()
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        counts += np.bincount(flat, minlength=vocab)
        docs += table.num_rows
    counts[manifest["tokenizer"]["eos_id"]] += docs
    return counts


def unigram_entropy(shard_dir: str, split: str = "train") -> float:
    counts = token_counts(shard_dir, split)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(shard_dir: str, fit: str = "train", score: str = "valid") -> float:
    """Mean -log p_fit(token) over `score`'s tokens; add-one smoothing keeps unseen ids finite."""
    fitted = token_counts(shard_dir, fit) + 1
    logp = np.log(fitted / fitted.sum())
    scored = token_counts(shard_dir, score)
    return float(-(scored * logp).sum() / scored.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shard_dir")
    args = ap.parse_args()
    print(json.dumps({"train_unigram_entropy": unigram_entropy(args.shard_dir),
                      "valid_unigram_cross_entropy": unigram_cross_entropy(args.shard_dir)}))


if __name__ == "__main__":
    main()
