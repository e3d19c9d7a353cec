"""Ulysses sequence parallelism: DeepSpeed's DistributedAttention around an attention core.

The `sp` ranks of a sequence-parallel group each hold T/sp consecutive positions of every sequence
of the micro batch. Everything but attention works per position, so it runs on the local slice
unchanged; attention's heads are independent, so around each `AttentionCore` one all-to-all turns
[B, T/sp, heads, D] into [B, T, heads/sp, D] (every position, a slice of the heads) and one after it
turns the output back. Positions (RoPE, learned) are the global ones, and a document mask is
built from the whole sequence's document ids.

megalm.train.sequence applies it to an LLM; `parallel.sequence_parallel` turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from megalm.engine.tensor import new_groups

if TYPE_CHECKING:  # annotation only: the engine does not import the models
    from megalm.models.llm import DocumentMask


class UlyssesCore(nn.Module):
    """An attention core (megalm.models.llm.AttentionCore) run on all positions of heads/sp heads.
    The mask of the whole sequence is set in `full_mask` before each forward (the blocks only see
    their local slice)."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup):
        # DeepSpeed takes seconds to import and fixes its accelerator when imported: config loading
        # (which reaches this module through the task) must not pay for it
        from deepspeed.sequence.layer import DistributedAttention

        super().__init__()
        self.core = core
        self.full_mask: torch.Tensor | DocumentMask | None = None
        # scatter the heads (dim 2), gather the positions (dim 1); the batch is dim 0
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
        return self.core(q, k, v, self.full_mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.exchange(q, k, v, 0)


class SequenceGroups:
    """The process groups of data × sequence parallelism, in the form DeepSpeed's `mpu` argument
    takes (its Megatron-style model-parallel unit). Ranks are laid out sequence-innermost, as
    Megatron does with its context-parallel groups: rank = dp_rank * sp + sp_rank, so a group's
    all-to-alls stay inside a node when sp divides the GPUs per node.

    DeepSpeed reduces gradients and partitions ZeRO state over the sequence-data-parallel group
    (every rank here), dividing by the data-parallel size only (ZeRO-0/1/2; ZeRO-3 by all of
    them: megalm.engine.runtime.backward_factor): the group's loss shares add up."""

    def __init__(self, sp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % sp:
            raise ValueError(f"world size {world} is not a multiple of sequence_parallel={sp}")
        self.sp, self.dp = sp, world // sp
        self.sp_rank, self.dp_rank = rank % sp, rank // sp
        self.sp_group = new_groups([list(range(d * sp, (d + 1) * sp)) for d in range(self.dp)])
        self.seq_dp_group = new_groups([list(range(world))])
        # No model parallelism: each rank is its own model-parallel group (DeepSpeed reduces norms
        # over it).
        self.mp_group = new_groups([[r] for r in range(world)])

    # -- what DeepSpeed asks of an mpu (deepspeed.utils.groups) --------------------------------
    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sp * self.dp

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        # The group ZeRO-3 partitions parameters over when it converts the model
        # (deepspeed.runtime.zero.parameter_offload asks the mpu for it): it must be the one its
        # reduce-scatter and optimizer partitions use, the data × sequence ranks. With the pure
        # data-parallel group, parameters stayed whole while gradients were scattered (measured:
        # another loss curve from the first update). Batch arithmetic asks the world size below.
        return self.seq_dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.sp * self.dp))  # get_data_parallel_group's ranks

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mp_group
