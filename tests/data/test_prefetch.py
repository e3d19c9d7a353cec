"""Prefetcher: the same micro batches as the wrapped loader, one step read ahead on a worker thread,
with the loader state of what the trainer took (exact resume), skips and state loads rewinding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megalm.data import DataConfig, build_loader
from megalm.data.prefetch import Prefetcher
from tests.data.shards import unique_docs, write_shard_dir
from tests.data.test_loader import sample_keys

GB, SEQ, MICRO = 8, 12, 2


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("prefetch")
    d = write_shard_dir(str(root / "a"), {"train": unique_docs(80, rng, first=10), "valid": unique_docs(10, rng, first=9000)})
    return DataConfig(paths=[d], seq_len=SEQ, seed=3)


class Counting:
    """A loader that counts the steps drawn from it (to see the read-ahead happen)."""

    def __init__(self, inner):
        self.inner, self.drawn = inner, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def skip(self, n):
        self.inner.skip(n)


def test_same_batches_and_state_as_the_plain_loader(cfg):
    plain = build_loader(cfg, GB, MICRO)
    pre = Prefetcher(build_loader(cfg, GB, MICRO))
    try:
        for step in range(6):
            want, got = next(plain), next(pre)
            assert sample_keys(got) == sample_keys(want)
            for a, b in zip(got, want):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            # The read-ahead step is not taken: the state is the plain loader's after the same steps.
            assert pre.state_dict() == plain.state_dict()
            if step == 2:
                pre.skip(3)
                plain.skip(3)
            if step == 4:
                pre.close()  # then it goes on reading in the caller's thread, in the same order
    finally:
        pre.close()


def test_reads_one_step_ahead_and_rewinds_for_resume(cfg):
    inner = Counting(build_loader(cfg, GB, MICRO))
    pre = Prefetcher(inner)
    try:
        first = next(pre)
        pre.wait()  # explicit barrier: the worker has produced the next step
        assert inner.drawn == 2
        saved = pre.state_dict()
        second = next(pre)
        # A state load (resume or roll-back) drops the read-ahead step and continues from the state.
        pre.load_state_dict(saved)
        assert sample_keys(next(pre)) == sample_keys(second)
        fresh = build_loader(cfg, GB, MICRO)
        fresh.load_state_dict(saved)
        assert sample_keys(next(fresh)) == sample_keys(second) != sample_keys(first)
    finally:
        pre.close()


def test_errors_reach_the_trainer(cfg):
    class Broken(Counting):
        def __next__(self):
            raise ValueError("shard 3: checksum mismatch")

    pre = Prefetcher(Broken(build_loader(cfg, GB, MICRO)))
    try:
        with pytest.raises(ValueError, match="checksum mismatch"):
            next(pre)
    finally:
        pre.close()


def test_attributes_come_from_the_wrapped_loader(cfg):
    loader = build_loader(cfg, GB, MICRO)
    pre = Prefetcher(loader)
    try:
        assert pre.source_weights() == loader.source_weights() and pre.sources is loader.sources
    finally:
        pre.close()
