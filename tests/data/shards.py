"""Test helper: write shard directories exactly per docs/interfaces.md, independent of data_prep.

Documents are given as token arrays; the helper writes Arrow IPC files (one `tokens:
list<uint16|uint32>` column, several record batches per shard), a stand-in tokenizer.model and
manifest.json last. `unique_docs` makes documents whose tokens are all distinct, so a sample's
content identifies it (used to check "every sample exactly once").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

EOS_ID = 2


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_shard_file(
    path: str, lengths: np.ndarray, values: np.ndarray, batch_rows: int = 1000, compression: str | None = None
) -> dict:
    """Write documents (lengths, flat values) as one Arrow IPC file; return its manifest entry."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vtype = pa.from_numpy_dtype(values.dtype)
    schema = pa.schema([("tokens", pa.list_(vtype))])
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        for r0 in range(0, max(len(lengths), 1), batch_rows):
            r1 = min(r0 + batch_rows, len(lengths))
            o = offsets[r0 : r1 + 1]
            local = (o - o[0]).astype(np.int32)
            arr = pa.ListArray.from_arrays(pa.array(local), pa.array(values[o[0] : o[-1]], type=vtype))
            writer.write_batch(pa.record_batch([arr], schema=schema))
    return {
        "file": os.path.basename(path),
        "rows": int(len(lengths)),
        "tokens": int(offsets[-1]),
        "bytes": os.path.getsize(path),
        "sha256": _sha256(path),
    }


def write_shard_dir(
    out: str,
    splits: dict[str, Sequence[np.ndarray]],
    vocab_size: int = 65535,
    eos_id: int = EOS_ID,
    shard_docs: int = 50,
    batch_rows: int = 16,
    tokenizer_bytes: bytes = b"stand-in sentencepiece model",
    compression: str | None = None,
) -> str:
    """Write `out/` with one entry per split (list of documents, each an int array)."""
    os.makedirs(out, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    tok_path = os.path.join(out, "tokenizer.model")
    with open(tok_path, "wb") as f:
        f.write(tokenizer_bytes)
    manifest_splits = {}
    for name, docs in splits.items():
        shards = []
        for s, d0 in enumerate(range(0, max(len(docs), 1), shard_docs)):
            part = docs[d0 : d0 + shard_docs]
            lengths = np.array([len(d) for d in part], dtype=np.int64)
            values = np.concatenate([np.asarray(d, dtype=dtype) for d in part]) if part else np.zeros(0, dtype)
            path = os.path.join(out, f"{name}-{s:05d}.arrow")
            shards.append(write_shard_file(path, lengths, values, batch_rows, compression))
        manifest_splits[name] = {
            "documents": sum(x["rows"] for x in shards),
            "tokens": sum(x["tokens"] for x in shards),
            "shards": shards,
        }
    write_manifest(out, manifest_splits, vocab_size, eos_id, np.dtype(dtype).name, _sha256(tok_path))
    return out


def write_manifest(out: str, splits: dict, vocab_size: int, eos_id: int, dtype: str, tok_sha: str) -> None:
    manifest = {
        "format": "megalm-shards",
        "format_version": 1,
        "tokenizer": {
            "path": "tokenizer.model",
            "sha256": tok_sha,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "bos_id": 1,
            "pad_id": 0,
            "unk_id": 3,
        },
        "dtype": dtype,
        "splits": splits,
        "stats": {"note": "written by tests/data/shards.py"},
    }
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, "manifest.json"))


def unique_docs(n_docs: int, rng: np.random.Generator, min_len: int = 1, max_len: int = 40, first: int = 10) -> list[np.ndarray]:
    """Documents of random length whose tokens are consecutive ids, all distinct, never EOS."""
    lengths = rng.integers(min_len, max_len + 1, size=n_docs)
    starts = first + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, lengths)]


def random_docs(n_docs: int, rng: np.random.Generator, vocab_size: int, min_len: int = 0, max_len: int = 60) -> list[np.ndarray]:
    """Documents of random tokens in [EOS_ID + 1, vocab_size) (no EOS inside, per the contract)."""
    return [rng.integers(EOS_ID + 1, vocab_size, size=int(n)) for n in rng.integers(min_len, max_len + 1, size=n_docs)]
