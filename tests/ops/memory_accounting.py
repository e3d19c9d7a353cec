"""Counting live tensor memory without torch.cuda: a dispatch mode that sees every aten op's
outputs, tracks each new storage until the last tensor using it dies, and keeps the peak."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated inside the mode (inputs made before it do not count).

    `allocs` lists (op name, shape, dtype, nbytes) for every new storage, in order.
    """

    def __init__(self, *known: torch.Tensor) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.allocs: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        self._refs: dict[int, int] = {}  # storage data_ptr -> live tensors using it
        self._size: dict[int, int] = {}
        self._external = {t.untyped_storage().data_ptr() for t in known}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.current -= self._size.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._external:
                continue
            if key not in self._refs:
                self._refs[key], self._size[key] = 0, nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                self.allocs.append((str(func), tuple(t.shape), t.dtype, nbytes))
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out
