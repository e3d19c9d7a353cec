"""Turn packed windows into a micro batch dict (contract: docs/interfaces.md, "Batches").

Choices, per token t of the inputs (window w, T = seq_len):
- `input_ids[t] = w[t]`, `labels[t] = w[t + 1]`.
- `doc_ids[t]`: index of the document within this sample (0, 1, ...); equal = same document.
  A document's EOS belongs to that document, so "... last token -> EOS" is a normal target.
- `labels[t] = -100` where w[t] is a document's EOS and w[t+1] starts the next document: with
  per-document attention the EOS position sees nothing of the next document, so that target
  would only teach the unigram distribution of first tokens; we mask it instead.
- `position_ids[t]` counts from 0 at each document start *within the window*; a window that
  starts mid-document starts at 0 too (the model sees none of the earlier tokens, and positions
  stay < seq_len, which learned position tables and RoPE caches assume).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megalm.data.packed import Window

IGNORE_INDEX = -100


def collate(windows: Sequence[Window]) -> dict[str, torch.Tensor]:
    """Stack windows of one seq_len into int64 `[B, T]` tensors (vectorised over the batch)."""
    if not windows:
        raise ValueError("collate needs at least one window")
    b, t = len(windows), windows[0].tokens.shape[0] - 1
    tokens = np.stack([w.tokens for w in windows])  # storage dtype (uint16/32): cheap to stack
    lens = np.concatenate([w.seg_lens for w in windows])  # all segments of all rows, row-major
    n_seg = np.array([w.seg_lens.shape[0] for w in windows], dtype=np.int64)
    first_seg = np.cumsum(n_seg) - n_seg
    last_seg = first_seg + n_seg - 1
    # inputs drop each window's final token: shorten each row's last segment by one so the
    # flat layout below is exactly [B, T] (no slicing copies)
    lens[last_seg] -= 1
    seg_start = np.cumsum(lens) - lens  # flat offset of each segment in [B, T]
    # doc id = segment index within its row; position = offset from its segment's start
    local = np.arange(lens.shape[0], dtype=np.int64) - np.repeat(first_seg, n_seg)
    doc = np.repeat(local, lens).reshape(b, t)
    pos = (np.arange(b * t, dtype=np.int64) - np.repeat(seg_start, lens)).reshape(b, t)
    labels = tokens[:, 1:].astype(np.int64)
    # the target after every segment end except each row's last (that one is the window end)
    # is the next document's first token: masked
    not_last = np.ones(lens.shape[0], dtype=bool)
    not_last[last_seg] = False
    labels.reshape(-1)[seg_start[not_last] + lens[not_last] - 1] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(tokens[:, :t].astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
        "doc_ids": torch.from_numpy(doc),
    }
