"""Ulysses sequence parallelism: DeepSpeed's DistributedAttention around an attention core.

The `sp` ranks of a sequence-parallel group each hold T/sp consecutive positions of every sequence
of the micro batch. Everything but attention works per position, so it runs on the local slice
unchanged; attention's heads are independent, so around each `AttentionCore` one all-to-all turns
[B, T/sp, heads, D] into [B, T, heads/sp, D] (every position, a slice of the heads) and one after it
turns the output back. Positions (RoPE, learned) are the global ones, and a document mask is
built from the whole sequence's document ids.

megalm.train.sequence applies it to an LLM; not a `megalm train` option yet (issue 21).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.sequence.layer import DistributedAttention


class UlyssesCore(nn.Module):
    """An attention core (megalm.models.llm.AttentionCore) run on all positions of heads/sp heads.
    The mask of the whole sequence is set in `full_mask` before each forward (the blocks only see
    their local slice)."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.core = core
        self.full_mask: torch.Tensor | None = None
        # scatter the heads (dim 2), gather the positions (dim 1); the batch is dim 0
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
        return self.core(q, k, v, self.full_mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.exchange(q, k, v, 0)
