"""Pack one split's documents into fixed windows of `seq_len + 1` tokens, with random access.

Per epoch e the documents are put in a seeded order, each followed by EOS, and concatenated
into one stream; sample j of the epoch is the window starting at `order_e[j] * seq_len` (windows
overlap by one token so every stream token is a target exactly once: inputs = w[:-1],
labels = w[1:]). The stream's tail shorter than a window is dropped (< seq_len tokens/epoch).
Sample i of the dataset is sample i % n of epoch i // n, so a run may go past one pass.

Nothing here scans token data: an epoch's layout is cumulative document lengths (from the
Arrow offsets), and `window(i)` binary-searches them and copies O(seq_len) tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from megalm.data.shards import DocIndex

_EPOCH_CACHE = 2  # a source is read near one epoch at a time; 2 covers the boundary


@dataclass(frozen=True)
class Window:
    """One packed sample: `tokens` [seq_len+1] and how it splits into documents.

    `seg_lens[k]` is the number of window tokens from the k-th document it touches (the
    document's EOS counts as that document's last token). sum(seg_lens) == seq_len + 1.
    """

    tokens: np.ndarray
    seg_lens: np.ndarray


def seeded_permutation(n: int, seed_words: list[int]) -> np.ndarray:
    """A permutation of range(n) that stays the same across numpy versions.

    `Generator.permutation` may change its algorithm between numpy releases, which would
    silently break exact resume; SeedSequence and PCG64's raw output are stable by numpy's
    policy. Sort keys are made unique (low bits = index), so any sort algorithm gives the
    same order.
    """
    if n <= 1:
        return np.arange(n)
    bits = (n - 1).bit_length()
    raw = np.random.PCG64(seed_words).random_raw(n)
    keys = (raw >> np.uint64(bits) << np.uint64(bits)) | np.arange(n, dtype=np.uint64)
    return np.argsort(keys)


class _Epoch:
    __slots__ = ("doc_order", "seg_end", "sample_order")

    def __init__(self, doc_order: np.ndarray, seg_end: np.ndarray, sample_order: np.ndarray):
        self.doc_order = doc_order  # document g at stream position k: doc_order[k]
        self.seg_end = seg_end  # cumulative (len + 1) in stream order: end of segment k
        self.sample_order = sample_order  # sample j of the epoch starts at sample_order[j] * seq_len


class PackedDataset:
    """Infinite, deterministic sequence of packed windows over one split of one manifest."""

    def __init__(self, docs: DocIndex, seq_len: int, eos_id: int, seed: int, shuffle: bool = True, stream_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.docs = docs
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.seed = seed
        self.shuffle = shuffle
        self.stream_id = stream_id  # separates the random streams of blended sources
        self.stream_tokens = docs.tokens + docs.documents  # one EOS per document
        self.samples_per_epoch = max(0, (self.stream_tokens - 1) // seq_len)
        self._eos = np.array([eos_id], dtype=docs.chunks[0].dtype if docs.chunks else np.uint16)
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()

    def __len__(self) -> int:
        """Samples in one epoch (the dataset itself repeats without end)."""
        return self.samples_per_epoch

    def _permutation(self, n: int, epoch: int, purpose: int) -> np.ndarray:
        return seeded_permutation(n, [self.seed, self.stream_id, epoch, purpose])

    def epoch(self, e: int) -> _Epoch:
        ep = self._epochs.get(e)
        if ep is not None:
            self._epochs.move_to_end(e)
            return ep
        n_docs, n = self.docs.documents, self.samples_per_epoch
        if self.shuffle:
            doc_order = self._permutation(n_docs, e, 0)
            sample_order = self._permutation(n, e, 1)
        else:
            doc_order = np.arange(n_docs)
            sample_order = np.arange(n)
        seg_end = np.cumsum(self.docs.doc_len[doc_order] + 1)
        ep = _Epoch(doc_order, seg_end, sample_order)
        self._epochs[e] = ep
        while len(self._epochs) > _EPOCH_CACHE:
            self._epochs.popitem(last=False)
        return ep

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample i -> (epoch, stream start token of its window)."""
        if self.samples_per_epoch == 0:
            raise IndexError("split holds fewer than seq_len + 1 tokens: no sample fits")
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        e, j = divmod(i, self.samples_per_epoch)
        return e, int(self.epoch(e).sample_order[j]) * self.seq_len

    def window(self, i: int) -> Window:
        """The packed window of global sample i (O(seq_len + log documents))."""
        return self.windows(np.array([i]))[0]

    def windows(self, idx: np.ndarray) -> list[Window]:
        """Windows of several global samples, batched so numpy overheads are paid once per
        batch and python work is one slice per document touched (never per token)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.samples_per_epoch == 0:
            raise IndexError("split holds fewer than seq_len + 1 tokens: no sample fits")
        if idx.size and int(idx.min()) < 0:
            raise IndexError(f"sample index must be >= 0, got {int(idx.min())}")
        out: list[Window] = [None] * idx.size  # type: ignore[list-item]
        epochs, j = np.divmod(idx, self.samples_per_epoch)
        for e in np.unique(epochs).tolist():  # nearly always one epoch per call
            sel = np.flatnonzero(epochs == e)
            for r, w in zip(sel.tolist(), self._epoch_windows(self.epoch(e), j[sel])):
                out[r] = w
        return out

    def _epoch_windows(self, ep: _Epoch, j: np.ndarray) -> list[Window]:
        need = self.seq_len + 1
        start = ep.sample_order[j] * self.seq_len
        end = start + need  # exclusive
        # segments (a document + its EOS, in stream order) overlapping [start, end), all rows flat
        k0 = np.searchsorted(ep.seg_end, start, side="right")
        n_seg = np.searchsorted(ep.seg_end, end - 1, side="right") + 1 - k0
        first = np.cumsum(n_seg) - n_seg
        row = np.repeat(np.arange(j.size), n_seg)
        k = np.arange(int(n_seg.sum())) - first[row] + k0[row]
        g = ep.doc_order[k]
        lens = self.docs.doc_len[g]
        seg_e = ep.seg_end[k]
        seg_s = seg_e - lens - 1
        lo = np.maximum(seg_s, start[row])
        hi = np.minimum(seg_e, end[row])
        begin = self.docs.doc_begin[g]
        tok_from = begin + (lo - seg_s)
        tok_to = begin + np.minimum(hi - seg_s, lens)
        chunks = self.docs.chunks
        parts = [chunks[c][a:b] for c, a, b in zip(self.docs.doc_chunk[g].tolist(), tok_from.tolist(), tok_to.tolist())]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=self._eos.dtype)
        # a segment's EOS is in the window iff the window reaches the segment's end; insert
        # them all at once after each such segment's document tokens
        with_eos = hi == seg_e
        flat = np.insert(flat, np.cumsum(tok_to - tok_from)[with_eos], self.eos_id)
        tokens = flat.reshape(j.size, need)
        seg_lens = hi - lo
        return [Window(tokens=tokens[r], seg_lens=seg_lens[f : f + n]) for r, (f, n) in enumerate(zip(first.tolist(), n_seg.tolist()))]
