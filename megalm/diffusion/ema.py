"""Exponential moving average of the weights, sharded across data-parallel ranks.

The EMA is one fp32 vector over all parameters in `named_parameters()` order; data-parallel rank
r of R keeps only its slice [r·n/R, (r+1)·n/R), on the weights' device (an update never waits
for the host: the step keeps its one host synchronisation), so memory per rank falls with the DP
size as ZeRO's partitions do. The slice layout depends only on (n, R), so a checkpoint (the slices
concatenated) resumes on any DP size and `megalm sample` rebuilds the full weights without an
engine.

Rule per applied optimizer step k (1-based): d_k = min(decay, (1 + k) / (10 + k)),
ema <- d_k · ema + (1 - d_k) · w. The warm-up keeps early EMAs from being dominated by the
random initialisation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from megalm.engine.runtime import gathered


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def effective_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


def _gathered(module: nn.Module, zero3: bool) -> contextlib.AbstractContextManager:
    return gathered(module.parameters(), zero3)


def _full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty placeholder behind


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float, rank: int, world: int, zero3: bool = False):
        self.decay, self.rank, self.world, self.zero3 = decay, rank, world, zero3
        self.names = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in module.named_parameters()]
        self.numel = sum(_full_numel(p) for _, p in module.named_parameters())
        self.lo, self.hi = shard_bounds(self.numel, rank, world)
        self.updates = 0
        self.device = next(module.parameters()).device
        self.shard = self._current(module)

    def _pieces(self, module: nn.Module) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(parameter, first, last) for the parts of each parameter inside this rank's slice."""
        offset = 0
        for _, p in module.named_parameters():
            n = _full_numel(p)
            lo, hi = max(self.lo, offset), min(self.hi, offset + n)
            if lo < hi:
                yield p, lo - offset, hi - offset
            offset += n

    def _current(self, module: nn.Module) -> torch.Tensor:
        """This rank's slice of the live weights, fp32 (collective under ZeRO-3)."""
        with torch.no_grad(), _gathered(module, self.zero3):
            parts = [p.detach().reshape(-1)[a:b].float() for p, a, b in self._pieces(module)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = effective_decay(self.decay, self.updates)
        self.shard.mul_(d).add_(self._current(module), alpha=1 - d)

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective: every rank's slice gathered, so rank 0's client state holds the whole EMA."""
        shards: list[Any] = [None] * self.world
        if dist.is_initialized() and self.world > 1:
            dist.all_gather_object(shards, self.shard.cpu())
        else:
            shards = [self.shard.cpu()]
        return {"flat": torch.cat(shards).clone(), "updates": self.updates, "decay": self.decay,
                "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        flat = state["flat"]
        if flat.numel() != self.numel or [tuple(x) for x in state["names"]] != [tuple(x) for x in self.names]:
            raise ValueError(f"EMA state holds {flat.numel()} values for other parameters than this model's "
                             f"{self.numel}")
        self.shard = flat[self.lo:self.hi].float().to(self.device, copy=True)
        self.updates = int(state["updates"])


def load_flat(module: nn.Module, flat: torch.Tensor) -> None:
    """Copy a full EMA vector (named_parameters order) into a plain module's parameters."""
    offset = 0
    with torch.no_grad():
        for _, p in module.named_parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"EMA vector has {flat.numel()} values, the model {offset}")
