"""A plain LLM trained with Ulysses sequence parallelism (megalm.engine.sequence): its attention
cores are swapped from outside, the model itself is unchanged. Exact against one rank
(tests/train/test_sequence.py); not a `megalm train` option yet (issue 21)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from megalm.data.batch import IGNORE_INDEX
from megalm.engine.sequence import UlyssesCore
from megalm.errors import UserError
from megalm.models.llm import LLM, default_position_ids, document_mask


class SequenceParallelLM(nn.Module):
    """`model` with its attention cores exchanged over `group`. forward takes the whole micro batch
    (every rank of the group the same) and returns this rank's share of the mean loss: the shares
    of the group add up to the one-rank loss, and so do their gradients."""

    def __init__(self, model: LLM, group: dist.ProcessGroup):
        super().__init__()
        c, sp = model.config, dist.get_world_size(group)
        if c.n_kv_heads % sp or c.n_heads % sp:
            raise UserError(f"parallel.sequence_parallel: {sp} must divide model.n_heads ({c.n_heads}) and "
                            f"model.n_kv_heads ({c.n_kv_heads})")
        self.model, self.group, self.sp, self.rank = model, group, sp, dist.get_rank(group)
        self.cores = [UlyssesCore(block.attention.core, group) for block in model.layers]
        for block, core in zip(model.layers, self.cores):
            block.attention.core = core

    def local_slice(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a [B, T, ...] tensor."""
        T = t.shape[1]
        if T % self.sp:
            raise UserError(f"data.seq_len: {T} positions do not split evenly over sequence_parallel={self.sp}")
        n = T // self.sp
        return t[:, self.rank * n:(self.rank + 1) * n]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        mask = document_mask(doc_ids) if doc_ids is not None else None
        local_labels = self.local_slice(labels)
        local, total = torch.stack([(local_labels != IGNORE_INDEX).sum(), (labels != IGNORE_INDEX).sum()]).tolist()
        if local == 0:
            # Still a loss with a backward: the group's ranks meet in each exchange's backward too.
            local_labels = local_labels.clone()
            local_labels[0, 0] = 0
        for core in self.cores:
            core.full_mask = mask
        try:
            loss = self.model(self.local_slice(input_ids), self.local_slice(position_ids), None, local_labels)
        finally:
            for core in self.cores:
                core.full_mask = None
        # The model's loss is the mean over this slice's targets; weighted by the slice's share of
        # the micro batch's targets, the group's shares add up to the whole-sequence mean.
        return loss * (local / max(total, 1))
