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
        self._dtype = docs.chunks[0].dtype if docs.chunks else np.uint16
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()

    def __len__(self) -> int:
        """Samples in one epoch (the dataset itself repeats without end)."""
        return self.samples_per_epoch

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, self.stream_id, epoch, purpose]))

    def epoch(self, e: int) -> _Epoch:
        ep = self._epochs.get(e)
        if ep is not None:
            self._epochs.move_to_end(e)
            return ep
        n_docs, n = self.docs.documents, self.samples_per_epoch
        if self.shuffle:
            doc_order = self._rng(e, 0).permutation(n_docs)
            sample_order = self._rng(e, 1).permutation(n)
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
        e, start = self.locate(i)
        ep = self.epoch(e)
        need = self.seq_len + 1
        out = np.empty(need, dtype=self._dtype)
        seg_lens = []
        # first segment whose end lies past `start`
        k = int(np.searchsorted(ep.seg_end, start, side="right"))
        pos = start - (int(ep.seg_end[k - 1]) if k else 0)  # offset inside segment k
        filled = 0
        docs = self.docs
        while filled < need:
            g = int(ep.doc_order[k])
            n_doc = int(docs.doc_len[g])
            take = min(n_doc + 1 - pos, need - filled)
            from_doc = max(0, min(n_doc - pos, take))
            if from_doc:
                b = int(docs.doc_begin[g]) + pos
                out[filled : filled + from_doc] = docs.chunks[int(docs.doc_chunk[g])][b : b + from_doc]
            if take > from_doc:  # the segment's EOS is inside the window
                out[filled + from_doc] = self.eos_id
            filled += take
            seg_lens.append(take)
            k += 1
            pos = 0
        return Window(tokens=out, seg_lens=np.asarray(seg_lens, dtype=np.int64))
