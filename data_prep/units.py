"""Work units and shards: small runs of input documents, tokenized in parallel, appended in
input order to the shard they belong to.

Unit boundaries depend only on the input (a unit closes once it holds `chars_per_unit`
characters) and shard `s` is units `[s*k, (s+1)*k)`, so shard `s` always produces the same
`train-s.arrow` / `valid-s.arrow` whichever workers or ranks tokenized its units: that is what
makes the output byte-identical for any parallelism, and what lets a re-run skip the shards
whose result file (`.units/shard-s.json`) and files check out. Units are small (~1M
characters) so that every worker has work from the first megabytes of input, whatever
`--shard-size-mb` says. A shard's renames are made durable by one directory fsync before the
manifest; until then a crash can at worst lose a rename, which the checksum check on resume
notices (the shard is redone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalm.fsio import atomic_write, sha256_file

from .encoder import Encoder, take_ranges
from .shards import encode_shard

UNIT_CHARS = 1 << 20  # characters of input per work unit (when shards are larger)
REMOVED = ("duplicates", "too_short_chars", "too_short_tokens")


@dataclass
class Unit:
    index: int
    texts: list[str] = field(default_factory=list)
    documents_in: int = 0
    duplicates: int = 0
    too_short_chars: int = 0


@dataclass(frozen=True)
class Layout:
    """How input characters map to units and units to shards."""

    chars_per_unit: int
    units_per_shard: int

    @classmethod
    def for_shards(cls, shard_size_mb: float, dtype_bytes: int) -> "Layout":
        """Shards of ~shard_size_mb (assumes ~4 characters per token) cut into units of at
        most UNIT_CHARS characters."""
        shard_chars = max(1, int(shard_size_mb * (1 << 20) / dtype_bytes * 4))
        units = max(1, round(shard_chars / UNIT_CHARS))
        return cls(max(1, -(-shard_chars // units)), units)

    def shard_of(self, unit: int) -> int:
        return unit // self.units_per_shard

    def is_last_of_shard(self, unit: int) -> bool:
        return (unit + 1) % self.units_per_shard == 0


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
    if valid_fraction <= 0:
        return np.zeros(len(texts), bool)
    threshold = int(valid_fraction * 2**64)
    return np.fromiter((int.from_bytes(_digest(t)[:8], "little") < threshold for t in texts),
                       bool, len(texts))


def _take(ids: np.ndarray, lens: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The id ranges of documents `rows` (sorted)."""
    if len(rows) == len(lens):
        return ids, lens
    return take_ranges(ids, np.cumsum(lens) - lens, lens, rows)


def encode_unit(unit: Unit, encoder: Encoder, min_tokens: int, valid_fraction: float) -> dict:
    """Tokenize a unit (in a worker): its train and valid rows and its counts."""
    ids, lens = encoder.encode(unit.texts)
    keep = lens >= max(min_tokens, 1)
    valid = is_valid(unit.texts, valid_fraction)
    parts = {}
    for split, mask in (("train", keep & ~valid), ("valid", keep & valid)):
        parts[split] = _take(ids, lens, np.flatnonzero(mask))
    return {"unit": unit.index, "parts": parts, "documents_in": unit.documents_in,
            "removed": {"duplicates": unit.duplicates, "too_short_chars": unit.too_short_chars,
                        "too_short_tokens": int((~keep).sum())},
            "text_chars": sum(map(len, unit.texts))}


def result_path(out: Path, shard: int) -> Path:
    return out / ".units" / f"shard-{shard:05d}.json"


def finished(out: Path, shard: int) -> dict | None:
    """The shard's recorded result if it and all its files are intact, else None."""
    try:
        result = json.loads(result_path(out, shard).read_text())
        for entry in result["shards"]:
            path = out / entry["file"]
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                return None
        return result
    except (OSError, ValueError, KeyError):
        return None


def write_shard(out: Path, shard: int, units: list[dict], dtype: str) -> dict:
    """Concatenate a shard's unit results (in order), write its files atomically, then its
    result file; returns the result."""
    files = []
    lengths: list[np.ndarray] = []
    for split in ("train", "valid"):
        parts = [u["parts"][split] for u in units]
        lens = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
        if not len(lens):
            continue
        ids = np.concatenate([p[0] for p in parts])
        lengths.append(lens)
        data = encode_shard(ids, lens, dtype)
        name = f"{split}-{shard:05d}.arrow"
        atomic_write(out / name, data, sync_dir=False)
        files.append({"split": split, "file": name, "rows": int(len(lens)),
                      "tokens": int(lens.sum()), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(),
                      "max_token_id": int(ids.max()) if len(ids) else 0})
    all_lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    values, counts = np.unique(all_lens, return_counts=True)
    result = {"shard": shard, "units": len(units),
              "documents_in": sum(u["documents_in"] for u in units),
              "removed": {k: sum(u["removed"][k] for u in units) for k in REMOVED},
              "lengths": [[int(v), int(c)] for v, c in zip(values, counts)],
              "shards": files, "text_chars": sum(u["text_chars"] for u in units)}
    atomic_write(result_path(out, shard), json.dumps(result).encode(), sync_dir=False)
    return result
