"""`DataConfig` and the blended set of packed sources it opens.

A run's data is one global, deterministic sequence of samples: sample n comes from source k at
index i (blend.py), which is window i of that source's packed split (packed.py). Everything a
resumed run needs to find its place again is (fingerprint, seed, samples consumed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from megalm.config import Invalid, Section, validate_tree
from megalm.data.batch import collate
from megalm.data.blend import BlendIndex
from megalm.data.manifest import Manifest, load_manifest
from megalm.data.packed import PackedDataset, Window
from megalm.data.sft import SFTPackedDataset, collate_sft
from megalm.data.shards import open_split
from megalm.errors import UserError
from megalm.fsio import read_checked


@dataclass
class DataConfig(Section):
    """The `data:` section of a run config."""

    paths: list[str] = field(default_factory=list)  # shard dirs (data_prep output)
    weights: list[float] | None = None  # blend weights, one per path; None: by each source's samples
    seq_len: int = 256
    seed: int = 1234  # shuffling and blending order (resume checks it)
    split: str = "train"
    eval_split: str = "valid"
    verify: bool = False  # sha256 every shard at start-up (reads all the data once; catches corruption)

    def validate(self) -> None:
        if not isinstance(self.paths, list) or not self.paths or not all(isinstance(x, str) and x for x in self.paths):
            raise Invalid("paths", f"expected a non-empty list of shard directories, got {self.paths!r}")
        if self.weights is not None:
            if not isinstance(self.weights, list) or len(self.weights) != len(self.paths):
                raise Invalid("weights", f"expected {len(self.paths)} numbers (one per path), got {self.weights!r}")
            for i, w in enumerate(self.weights):
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                    raise Invalid(f"weights[{i}]", f"expected a finite number > 0, got {w!r}")
        for key in ("seq_len", "seed"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int):
                raise Invalid(key, f"expected an integer, got {val!r}")
        if self.seq_len < 1:
            raise Invalid("seq_len", f"expected >= 1, got {self.seq_len}")
        if self.seed < 0:
            raise Invalid("seed", f"expected >= 0, got {self.seed}")
        for key in ("split", "eval_split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise Invalid(key, f"expected a split name such as 'train', got {getattr(self, key)!r}")


KIND_HINT = {"text": "documents for pretraining: task lm", "sft": "instruction examples with a loss mask, made by "
             "megalm prep --sft: task sft"}


@dataclass(frozen=True)
class TokenizerFacts:
    path: str
    sha256: str
    vocab_size: int
    eos_id: int


def _shared_tokenizer(manifests: list[Manifest]) -> TokenizerFacts:
    first = manifests[0]
    t0 = first.tokenizer
    for m in manifests[1:]:
        t = m.tokenizer
        if (t.sha256, t.vocab_size, t.eos_id) != (t0.sha256, t0.vocab_size, t0.eos_id):
            raise UserError(
                f"{m.path}: tokenizer (sha256 {t.sha256[:12]}, vocab_size {t.vocab_size}, eos_id {t.eos_id}) "
                f"differs from {first.path} (sha256 {t0.sha256[:12]}, vocab_size {t0.vocab_size}, eos_id {t0.eos_id}); "
                "blended data must share one tokenizer"
            )
    for m in manifests:
        if not os.path.isfile(m.tokenizer.path):
            raise UserError(f"{m.path}: tokenizer.path: {m.tokenizer.path} does not exist")
    return TokenizerFacts(t0.path, t0.sha256, t0.vocab_size, t0.eos_id)


class Sources:
    """The packed datasets of one split of every configured manifest, blended by weight."""

    def __init__(self, cfg: DataConfig, split: str, shuffle: bool = True, kind: str = "text"):
        validate_tree(cfg, "config", "data")  # also built directly, not only from a config file
        self.cfg = cfg
        self.split = split
        self.kind = kind
        self.manifests = [load_manifest(p) for p in cfg.paths]
        for m in self.manifests:
            if m.kind != kind:
                raise UserError(f"{m.path}: kind: {m.kind!r} shards, but this run reads {kind!r} shards "
                                f"({KIND_HINT[m.kind]})")
        self.tokenizer = _shared_tokenizer(self.manifests)
        if cfg.verify:
            for m in self.manifests:
                _verify_tokenizer(m)
        self.datasets: list[PackedDataset] = []
        for k, m in enumerate(self.manifests):
            docs = open_split(m, split, verify=cfg.verify)
            if kind == "sft":
                ds = SFTPackedDataset(docs, cfg.seq_len, cfg.seed, shuffle=shuffle, stream_id=k)
                if len(ds) == 0:
                    raise UserError(f"{m.path}: splits.{split}: no example with a trained token")
            else:
                ds = PackedDataset(docs, cfg.seq_len, m.tokenizer.eos_id, cfg.seed, shuffle=shuffle, stream_id=k)
            if len(ds) == 0:
                raise UserError(
                    f"{m.path}: splits.{split}: {ds.stream_tokens} tokens (with EOS) cannot fill one sample of "
                    f"seq_len + 1 = {cfg.seq_len + 1} tokens"
                )
            self.datasets.append(ds)
        weights = cfg.weights if cfg.weights is not None else [float(len(d)) for d in self.datasets]
        self.blend = BlendIndex(weights)

    def collate(self, windows: list) -> dict:
        """A micro batch (docs/interfaces.md, "Batches") from this kind's windows."""
        if self.kind == "sft":
            return collate_sft(windows)
        return collate(windows)

    @property
    def fingerprint(self) -> str:
        """Identifies the sample sequence apart from the seed: data, split, weights, seq_len."""
        # the shards' content hashes, not manifest.json bytes: rewriting informational stats or
        # moving the directory must not block a resume, different data must
        desc = {
            "sources": [
                [m.dtype, m.tokenizer.sha256, [[s.rows, s.tokens, s.sha256] for s in m.split(self.split).shards]]
                for m in self.manifests
            ],
            "split": self.split,
            "blend": self.blend.counts,
            "seq_len": self.cfg.seq_len,
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def windows(self, start: int, count: int) -> list[Window]:
        """Windows of global samples [start, start + count)."""
        src, idx = self.blend.locate(np.arange(start, start + count))
        return self.gather(src, idx)

    def gather(self, src: np.ndarray, idx: np.ndarray) -> list[Window]:
        """Windows of (source, index within source) pairs, batched per source."""
        src, idx = np.asarray(src), np.asarray(idx)
        out: list[Window] = [None] * src.size  # type: ignore[list-item]
        for k in np.unique(src).tolist():
            sel = np.flatnonzero(src == k)
            for r, w in zip(sel.tolist(), self.datasets[k].windows(idx[sel])):
                out[r] = w
        return out

    def consumed_per_source(self, n: int) -> list[int]:
        """How many samples of each source the first n global samples take."""
        period, counts = self.blend.period, self.blend.counts
        p, o = divmod(n, period)
        head = self.blend.locate(range(n - o, n))[0] if o else []
        return [p * c + int((head == k).sum()) if o else p * c for k, c in enumerate(counts)]


def _verify_tokenizer(m: Manifest) -> None:
    read_checked(m.tokenizer.path, m.tokenizer.sha256, f"{m.path}: tokenizer.sha256")
