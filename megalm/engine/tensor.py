"""DeepSpeed AutoTP training: its tensor-parallel process groups and config section.

DeepSpeed keeps the data × tensor groups in module globals (deepspeed.utils.groups), creates them
once per process, and under AutoTP uses that module as the engine's model-parallel unit (`mpu`),
replacing any other. megalm creates the groups explicitly before each engine (and clears them for
an engine without TP), so engines of different layouts can follow each other in one process
(tests, jobs that build several). With sequence parallelism too, the module also gets the
sequence-parallel queries DeepSpeed asks an mpu for, so its ZeRO partitions over data ×
sequence ranks and sums the sequence-parallel loss shares (as with megalm.engine.sequence alone).

Layout, tensor-innermost (TP's all-reduces are the most frequent), then sequence, then data:
rank = (dp_rank * sp + sp_rank) * tp + tp_rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

# The mpu queries DeepSpeed makes for sequence parallelism (deepspeed.utils.groups._get_sequence_*).
_SEQUENCE_QUERIES = ("get_sequence_parallel_group", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
                     "get_sequence_data_parallel_group", "get_sequence_data_parallel_world_size",
                     "get_sequence_data_parallel_rank")


def _groups() -> Any:
    # DeepSpeed takes seconds to import and fixes its accelerator when imported: only engine
    # construction pays for it
    from deepspeed.utils import groups

    return groups


def reset_tensor_groups() -> None:
    """Forget the TP (and TP × SP) groups a previous engine in this process created."""
    g = _groups()
    g._TENSOR_MODEL_PARALLEL_GROUP = g._MODEL_PARALLEL_GROUP = g._DATA_PARALLEL_GROUP = None
    g._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = g._MPU_TENSOR_MODEL_PARALLEL_RANK = None
    for name in _SEQUENCE_QUERIES:
        g.__dict__.pop(name, None)


def new_groups(rank_lists: list[list[int]]) -> dist.ProcessGroup:
    """Collective (every rank creates every group, in the same order): the group holding this rank."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def tensor_groups(tp: int, sp: int = 1) -> Any:
    """Collective. DeepSpeed's groups module holding fresh tensor (size `tp`), sequence (`sp`) and
    data-parallel groups: the `mpu` for deepspeed.initialize (its batch arithmetic then counts
    data-parallel ranks only)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * sp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel × sequence_parallel ({tp} × {sp})")
    dp = world // (tp * sp)

    def at(d: int, s: int, t: int) -> int:
        return (d * sp + s) * tp + t

    reset_tensor_groups()
    g = _groups()
    # Explicit new_group calls rather than a DeviceMesh split: the same on gloo and NCCL.
    g._TENSOR_MODEL_PARALLEL_GROUP = g._MODEL_PARALLEL_GROUP = new_groups(
        [[at(d, s, t) for t in range(tp)] for d in range(dp) for s in range(sp)])
    g._DATA_PARALLEL_GROUP = new_groups([[at(d, s, t) for d in range(dp)] for s in range(sp) for t in range(tp)])
    if sp > 1:
        sp_group = new_groups([[at(d, s, t) for s in range(sp)] for d in range(dp) for t in range(tp)])
        zero_group = new_groups([[at(d, s, t) for d in range(dp) for s in range(sp)] for t in range(tp)])
        sp_rank = rank // tp % sp
        answers = (sp_group, sp, sp_rank, zero_group, dp * sp, rank // (tp * sp) * sp + sp_rank)
        for name, value in zip(_SEQUENCE_QUERIES, answers):
            setattr(g, name, lambda value=value: value)
    return g


def autotp_config(tp_plan: dict[str, Any]) -> dict[str, Any]:
    """The `tensor_parallel` section of the DeepSpeed config for megalm.train.tensor.plan()."""
    return {"autotp_size": tp_plan["size"],
            "partition_config": {"use_default_specs": False, "layer_specs": [
                {"patterns": list(tp_plan["column"]), "partition_type": "column"},
                {"patterns": list(tp_plan["row"]), "partition_type": "row"}]}}


def split_dim(name: str, tp_plan: dict[str, Any]) -> int | None:
    """The dimension along which tensor-parallel ranks hold slices of state-dict entry `name`
    (None: every rank holds it whole). A column weight's bias is split with it; a row weight's
    bias is added once, after the all-reduce, so it stays whole."""
    weight = name[:-len("bias")] + "weight" if name.endswith(".bias") else name
    if any(re.match(p, weight) for p in tp_plan["column"]):
        return 0
    if name == weight and any(re.match(p, name) for p in tp_plan["row"]):
        return 1
    return None


def merge_items(parts: list[Iterator[tuple[str, torch.Tensor]]], tp_plan: dict[str, Any]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor per name from the per-TP-rank streams `parts` (each in the same name order):
    slices concatenated in rank order, whole tensors from rank 0."""
    for entries in zip(*parts, strict=True):
        names = {name for name, _ in entries}
        if len(names) != 1:
            raise ValueError(f"tensor-parallel ranks' checkpoints disagree on the parameter order: {sorted(names)}")
        name = entries[0][0]
        dim = split_dim(name, tp_plan)
        yield name, entries[0][1] if dim is None else torch.cat([t for _, t in entries], dim)


def clip_grads(module: torch.nn.Module, norm: float, max_norm: float) -> None:
    """Scale `module`'s gradients so their global norm (`norm`, already known on the host) is at
    most `max_norm`, with DeepSpeed's ZeRO rule ((norm + 1e-6) / max_norm > 1 divides): one
    multi-tensor launch, no host read."""
    factor = (norm + 1e-6) / max_norm if max_norm > 0 and math.isfinite(norm) else 1.0
    if factor > 1:
        torch._foreach_div_([p.grad for p in module.parameters() if p.grad is not None], factor)


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `grads` together, accumulated in fp32 whatever their dtype (bf16 norms
    would quantise the logged norm and the clip factor)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def grad_norm(module: torch.nn.Module, tp_plan: dict[str, Any] | None) -> torch.Tensor:
    """Collective over the tensor-parallel group when `tp_plan` is set. The global gradient norm of
    `module` from the gradients each rank holds: split parameters contribute every rank's slice,
    whole ones (the same on every TP rank) once. No host read."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named:
        return torch.zeros(())
    if tp_plan is None:
        return _norm([g for _, g in named])
    split = [g for n, g in named if split_dim(n, tp_plan) is not None]
    whole = [g for n, g in named if split_dim(n, tp_plan) is None]
    zero = torch.zeros((), device=named[0][1].device)
    sumsq = torch.stack([_norm(split).square() if split else zero, _norm(whole).square() if whole else zero])
    dist.all_reduce(sumsq[:1], group=_groups().get_tensor_model_parallel_group())
    return sumsq.sum().sqrt()
