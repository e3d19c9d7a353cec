"""A plain LLM trained with Ulysses sequence parallelism (megalm.engine.sequence), applied from
outside and in place: the attention cores are swapped and two forward hooks slice the micro batch,
so the module, its parameter names and its checkpoints stay those of the plain model (a run saved
at sequence_parallel=2 resumes, samples and exports like any other). Exact against one rank
(tests/train/test_sequence.py, tests/train/test_sequence_train.py)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist

from megalm.data.batch import IGNORE_INDEX
from megalm.engine.sequence import UlyssesCore
from megalm.errors import UserError
from megalm.models.llm import LLM, DocumentMask, default_position_ids

_FORWARD = inspect.signature(LLM.forward)


def check_heads(n_heads: int, n_kv_heads: int, sp: int, tp: int = 1) -> None:
    """Each rank attends over heads/(sp·tp) whole heads: both head counts must split evenly."""
    if n_kv_heads % (sp * tp) or n_heads % (sp * tp):
        by = f"{sp} × tensor_parallel {tp}" if tp > 1 else f"{sp}"
        raise UserError(f"parallel.sequence_parallel: {by} must divide model.n_heads ({n_heads}) and "
                        f"model.n_kv_heads ({n_kv_heads})")


class SequenceParallel:
    """Applied to `model` over `group`: model(...) then takes the whole micro batch (every rank of
    the group the same) and returns this rank's share of the mean loss. The shares of the group
    add up to the one-rank loss, and so do their gradients; DeepSpeed's reduction over the
    sequence-data-parallel group sums them (it divides by the data-parallel size only)."""

    def __init__(self, model: LLM, group: dist.ProcessGroup):
        c, sp = model.config, dist.get_world_size(group)
        check_heads(c.n_heads, c.n_kv_heads, sp)
        self.model, self.group, self.sp, self.rank = model, group, sp, dist.get_rank(group)
        self.cores = [UlyssesCore(block.attention.core, group) for block in model.layers]
        for block, core in zip(model.layers, self.cores):
            block.attention.core = core
        self._share: torch.Tensor | None = None
        model.register_forward_pre_hook(self._slice, with_kwargs=True)
        model.register_forward_hook(self._weigh)

    def local_slice(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a [B, T, ...] tensor."""
        T = t.shape[1]
        if T % self.sp:
            raise UserError(f"data.seq_len: {T} positions do not split evenly over sequence_parallel={self.sp}")
        n = T // self.sp
        return t[:, self.rank * n:(self.rank + 1) * n]

    def _slice(self, module: LLM, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        a = _FORWARD.bind(module, *args, **kwargs).arguments
        input_ids, labels = a["input_ids"], a.get("labels")
        position_ids = a.get("position_ids")
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        doc_ids = a.get("doc_ids")
        mask = DocumentMask(doc_ids) if doc_ids is not None else None
        for core in self.cores:
            core.full_mask = mask
        self._share = None
        if labels is not None:
            local_labels = self.local_slice(labels)
            local = (local_labels != IGNORE_INDEX).sum()
            total = (labels != IGNORE_INDEX).sum().clamp(min=1)
            # A slice without targets still needs a loss with a backward: the group's ranks meet
            # in each exchange's backward too. A dummy target, weighted 0 below (no host read).
            local_labels = local_labels.clone()
            local_labels[0, 0] = torch.where(local == 0, torch.zeros_like(local_labels[0, 0]), local_labels[0, 0])
            # The model's loss is the mean over this slice's targets; weighted by the slice's share
            # of the micro batch's targets, the group's shares add up to the whole-sequence mean.
            self._share = local / total
            labels = local_labels
        return (self.local_slice(input_ids), self.local_slice(position_ids), None, labels), {}

    def _weigh(self, module: LLM, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The cores keep this forward's mask until the next one sets its own: activation
        # checkpointing runs the attention again during backward and needs the same mask.
        share, self._share = self._share, None
        return output if share is None else output * share.to(output.dtype)
