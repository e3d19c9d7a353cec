"""SFT examples packed whole into rows of `seq_len` positions, with document masks.

An example of L tokens fills L - 1 positions (inputs tokens[:-1], targets tokens[1:]); a target
is trained only where the example's loss mask is 1 (else -100: prompt and template tokens).
Examples are never split across rows, so a response always sees its whole prompt; one longer
than seq_len keeps its first seq_len + 1 tokens. `doc_ids` number the examples of a row and
`position_ids` restart at 0 for each, so attention never crosses examples and each example is
computed exactly as if it ran alone. The tail of a row is padding (its own document, no targets).

Packing is greedy in a seeded order decided once per dataset; each epoch then visits the packed
rows in its own seeded order. Packing once keeps the number of rows per epoch fixed, so global
sample i maps to (epoch, row) with no replay of earlier epochs — what exact resume and blending
need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megalm.data.batch import IGNORE_INDEX
from megalm.data.packed import seeded_permutation
from megalm.data.shards import DocIndex

PAD_ID = 0  # input id of padding positions (never a target, attends only to padding)


@dataclass(frozen=True)
class SFTRow:
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray


def greedy_pack(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Start index of each pack when `sizes` (each <= capacity) are filled in order, plus the end."""
    starts, fill = [0], 0
    for k, s in enumerate(sizes.tolist()):
        if fill + s > capacity:
            starts.append(k)
            fill = 0
        fill += s
    starts.append(len(sizes))
    return np.asarray(starts, dtype=np.int64)


class SFTPackedDataset:
    """Infinite, deterministic sequence of packed SFT rows over one split of one manifest."""

    def __init__(self, docs: DocIndex, seq_len: int, seed: int, shuffle: bool = True, stream_id: int = 0):
        if docs.mask_chunks is None:
            raise ValueError("SFTPackedDataset needs shards with a loss_mask column")
        self.docs, self.seq_len, self.seed, self.shuffle, self.stream_id = docs, seq_len, seed, shuffle, stream_id
        self.size = np.minimum(docs.doc_len - 1, seq_len)  # positions each example fills
        n = docs.documents
        order = seeded_permutation(n, [seed, stream_id, 0, 2]) if shuffle else np.arange(n)
        self.order = order[self.size[order] > 0]  # a 1-token example has no target
        self.pack_starts = greedy_pack(self.size[self.order], seq_len) if self.order.size else np.zeros(1, np.int64)
        self.samples_per_epoch = len(self.pack_starts) - 1
        self.truncated = int((docs.doc_len - 1 > seq_len).sum())
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _row_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.samples_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, seeded_permutation(self.samples_per_epoch, [self.seed, self.stream_id, epoch, 3]))
        return self._perm[1]

    def windows(self, idx: np.ndarray) -> list[SFTRow]:
        """The packed rows of global samples `idx`."""
        if self.samples_per_epoch == 0:
            raise IndexError("split holds no example with a target")
        out = []
        for i in np.asarray(idx, dtype=np.int64).tolist():
            if i < 0:
                raise IndexError(f"sample index must be >= 0, got {i}")
            e, j = divmod(i, self.samples_per_epoch)
            p = int(self._row_order(e)[j])
            out.append(self.row(self.order[self.pack_starts[p]:self.pack_starts[p + 1]]))
        return out

    def row(self, examples: np.ndarray) -> SFTRow:
        """Examples (document indices) laid side by side in one row, then padding."""
        T = self.seq_len
        ids = np.full(T, PAD_ID, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(T, dtype=np.int64)
        doc = np.zeros(T, dtype=np.int64)
        off = 0
        for k, g in enumerate(examples.tolist()):
            n = int(self.size[g])
            tok = self.docs.doc(g)[: n + 1].astype(np.int64)
            trained = self.docs.doc_mask(g)[1 : n + 1].astype(bool)
            ids[off:off + n] = tok[:-1]
            labels[off:off + n] = np.where(trained, tok[1:], IGNORE_INDEX)
            pos[off:off + n] = np.arange(n)
            doc[off:off + n] = k
            off += n
        pos[off:] = np.arange(T - off)
        doc[off:] = len(examples)
        return SFTRow(ids, labels, pos, doc)


def collate_sft(rows: Sequence[SFTRow]) -> dict[str, torch.Tensor]:
    """Stack rows into the micro-batch dict of docs/interfaces.md ("Batches")."""
    if not rows:
        raise ValueError("collate_sft needs at least one row")
    return {key: torch.from_numpy(np.stack([getattr(r, key) for r in rows]))
            for key in ("input_ids", "labels", "position_ids", "doc_ids")}
