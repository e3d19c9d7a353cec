"""Blending by weight: every prefix within one sample of the weights; O(1) random access."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from megalm.data import BlendIndex, DataConfig, Sources
from tests.data.shards import unique_docs, write_shard_dir


def _prefix_counts(src: np.ndarray, k: int) -> np.ndarray:
    """[n+1, k] counts of each source among the first n samples."""
    onehot = np.zeros((src.size + 1, k), dtype=np.int64)
    onehot[np.arange(1, src.size + 1), src] = 1
    return np.cumsum(onehot, axis=0)


@pytest.mark.parametrize(
    "weights",
    [[0.7, 0.3], [0.5, 0.2, 0.2, 0.1], [1, 1, 1], [3, 1], [0.6, 0.1, 0.1, 0.1, 0.05, 0.05], [0.97, 0.01, 0.01, 0.01]],
)
def test_exact_weights_every_prefix_within_one(weights):
    b = BlendIndex(weights)
    total = Fraction(sum(Fraction(w) for w in map(str, weights)))
    exact = [Fraction(str(w)) / total for w in weights]
    assert [Fraction(c, b.period) for c in b.counts] == exact  # rational weights are kept exactly
    n = 3 * b.period + 17
    src, idx = b.locate(np.arange(n))
    counts = _prefix_counts(src, len(weights))
    target = np.arange(n + 1)[:, None] * np.array([float(w) for w in exact])[None, :]
    assert np.abs(counts - target).max() < 1.0
    # index within a source is its running count: every sample of every source used once, in order
    for k in range(len(weights)):
        assert idx[src == k].tolist() == list(range(int((src == k).sum())))


def test_random_weights_within_one_of_rounded_weights():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        b = BlendIndex(list(rng.random(k) + 0.01))
        src, _ = b.locate(np.arange(b.period))
        counts = _prefix_counts(src, k)
        target = np.arange(b.period + 1)[:, None] * np.array(b.counts)[None, :] / b.period
        assert np.abs(counts - target).max() < 1.0
        assert counts[-1].tolist() == b.counts


def test_random_access_far_ahead_matches_sequential():
    b = BlendIndex([0.5, 0.3, 0.2])
    far = 10**12 + 12345
    src, idx = b.locate(np.arange(far, far + 50))
    src0, idx0 = b.locate(np.arange(12345, 12345 + 50))
    assert src.tolist() == src0.tolist()
    per_period = np.array(b.counts)[src0]
    assert (idx - idx0).tolist() == ((far - 12345) // b.period * per_period).tolist()


def test_bad_weights_rejected():
    for w in ([], [1.0, 0.0], [float("inf"), 1.0], [-1.0]):
        with pytest.raises(ValueError):
            BlendIndex(w)


def test_sources_blend_draws_from_each_manifest(tmp_path):
    rng = np.random.default_rng(3)
    a = write_shard_dir(str(tmp_path / "a"), {"train": unique_docs(40, rng, first=10)}, vocab_size=60000)
    b = write_shard_dir(str(tmp_path / "b"), {"train": unique_docs(40, rng, first=30000)}, vocab_size=60000)
    src = Sources(DataConfig(paths=[a, b], weights=[0.75, 0.25], seq_len=8), "train")
    n = 200  # more than one epoch of b at this weight: b repeats, a does not yet
    from_b = [bool(w.tokens.max() >= 30000) for w in src.windows(0, n)]
    counts = np.cumsum(from_b)
    assert np.abs(counts - 0.25 * np.arange(1, n + 1)).max() < 1.0
    assert src.consumed_per_source(n) == [n - int(counts[-1]), int(counts[-1])]
    # weights=None: in proportion to each source's samples per epoch
    natural = Sources(DataConfig(paths=[a, b], seq_len=8), "train")
    sizes = [len(d) for d in natural.datasets]
    assert natural.blend.weights == pytest.approx([s / sum(sizes) for s in sizes], abs=1 / natural.blend.period)
