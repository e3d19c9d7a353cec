"""Work units: fixed runs of input documents, each tokenized into its own shard files.

Unit boundaries depend only on the input (a unit closes once it holds `unit_chars` characters),
so unit i always produces the same `train-i.arrow` / `valid-i.arrow` whichever worker or rank
runs it: that is what makes the output byte-identical for any parallelism, and what lets a
re-run skip the units whose result file (`.units/unit-i.json`) and shards check out. A unit's
renames are made durable by one directory fsync before the manifest; until then a crash can at
worst lose a rename, which the checksum check on resume notices (the unit is redone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalm.fsio import atomic_write, sha256_file

from .shards import encode_shard
from .encoder import Encoder


@dataclass
class Unit:
    index: int
    texts: list[str] = field(default_factory=list)
    documents_in: int = 0
    duplicates: int = 0
    too_short_chars: int = 0


def unit_chars(shard_size_mb: float, dtype_bytes: int) -> int:
    """Characters of input per unit for shards of ~shard_size_mb (assumes ~4 chars/token)."""
    return max(1, int(shard_size_mb * (1 << 20) / dtype_bytes * 4))


def split_units(docs: Iterable[str], chars_per_unit: int) -> Iterator[tuple[int, list[str]]]:
    """Yield (unit index, raw documents) in input order."""
    index, batch, size = 0, [], 0
    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= chars_per_unit:
            yield index, batch
            index, batch, size = index + 1, [], 0
    if batch:
        yield index, batch


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Filter:
    """Decisions that need the documents before this one: run by every rank in input order."""

    def __init__(self, min_chars: int, dedup: bool):
        self.min_chars, self.dedup = min_chars, dedup
        self.seen: set[bytes] = set()  # 16-byte digests of kept texts (grows with the corpus)

    def apply(self, index: int, docs: list[str], owned: bool) -> Unit:
        unit = Unit(index, documents_in=len(docs))
        for text in docs:
            if len(text.strip()) < self.min_chars:
                unit.too_short_chars += 1
                continue
            if self.dedup:
                digest = _digest(text)
                if digest in self.seen:
                    unit.duplicates += 1
                    continue
                self.seen.add(digest)
            if owned:
                unit.texts.append(text)
        return unit


def is_valid(texts: list[str], valid_fraction: float) -> np.ndarray:
    """Train/valid split by content hash: stable under any reordering or parallelism."""
    threshold = int(valid_fraction * 2**64)
    return np.fromiter((int.from_bytes(_digest(t)[:8], "little") < threshold for t in texts),
                       bool, len(texts))


def result_path(out: Path, index: int) -> Path:
    return out / ".units" / f"unit-{index:05d}.json"


def finished(out: Path, index: int) -> dict | None:
    """The unit's recorded result if it and all its shards are intact, else None."""
    try:
        result = json.loads(result_path(out, index).read_text())
        for shard in result["shards"]:
            path = out / shard["file"]
            if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                return None
        return result
    except (OSError, ValueError, KeyError):
        return None


def process(unit: Unit, encoder: Encoder, out: Path, min_tokens: int,
            valid_fraction: float) -> dict:
    """Tokenize a unit, write its shards (atomically), then its result file; return the result."""
    dtype = str(encoder.dtype)
    ids, lens = encoder.encode(unit.texts)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    keep = lens >= max(min_tokens, 1)
    valid = is_valid(unit.texts, valid_fraction)
    shards = []
    for split, mask in (("train", keep & ~valid), ("valid", keep & valid)):
        rows = np.flatnonzero(mask)
        if not len(rows):
            continue
        if len(rows) == len(lens):
            part_ids, part_lens = ids, lens
        else:
            part_lens = lens[rows]
            # Gather the kept documents' id ranges with one vectorised index.
            starts = offsets[rows]
            ends = np.cumsum(part_lens)
            part_ids = ids[np.repeat(starts - (ends - part_lens), part_lens)
                           + np.arange(int(ends[-1]))]
        data = encode_shard(part_ids, part_lens, dtype)
        name = f"{split}-{unit.index:05d}.arrow"
        atomic_write(out / name, data, sync_dir=False)
        shards.append({"split": split, "file": name, "rows": int(len(rows)),
                       "tokens": int(part_lens.sum()), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    kept_lens = lens[keep]
    values, counts = np.unique(kept_lens, return_counts=True)
    result = {"unit": unit.index, "documents_in": unit.documents_in,
              "removed": {"duplicates": unit.duplicates, "too_short_chars": unit.too_short_chars,
                          "too_short_tokens": int((~keep).sum())},
              "lengths": [[int(v), int(c)] for v, c in zip(values, counts)],
              "shards": shards, "text_chars": sum(map(len, unit.texts))}
    atomic_write(result_path(out, unit.index), json.dumps(result).encode(), sync_dir=False)
    return result
