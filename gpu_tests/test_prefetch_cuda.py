"""The read-ahead loader hands out pinned host batches on a GPU, so the trainer's
`.to(device, non_blocking=True)` is an asynchronous copy (no pageable host→device copy)."""

from __future__ import annotations

import torch

from megalm.data.prefetch import Prefetcher


class Steps:
    """A Loader-protocol stand-in: step s is a micro batch of s's."""

    def __init__(self):
        self.s = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.s += 1
        return [{"input_ids": torch.full((2, 8), self.s, dtype=torch.long)}]

    def state_dict(self):
        return {"s": self.s}

    def load_state_dict(self, state):
        self.s = state["s"]

    def skip(self, n):
        self.s += n


def test_batches_are_pinned_and_copy_asynchronously():
    pre = Prefetcher(Steps(), pin_memory=True)
    try:
        for want in (1, 2, 3):
            (mb,) = next(pre)
            assert mb["input_ids"].is_pinned() and int(mb["input_ids"][0, 0]) == want
            dev = mb["input_ids"].to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(dev.cpu(), mb["input_ids"])
        assert pre.state_dict() == {"s": 3}  # the read-ahead step is not counted as taken
    finally:
        pre.close()
