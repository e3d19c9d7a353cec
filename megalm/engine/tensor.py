"""DeepSpeed AutoTP training: its tensor-parallel process groups and config section.

DeepSpeed keeps the data × tensor groups in module globals (deepspeed.utils.groups) and creates
them once per process; megalm creates them explicitly before each engine (and clears them for an
engine without TP), so engines of different layouts can follow each other in one process (tests,
`megalm` jobs that build several). The layout is DeepSpeed's: tensor-innermost, rank =
dp_rank * tp + tp_rank, so a TP group's all-reduces stay inside a node when tp divides its GPUs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def _groups() -> Any:
    # DeepSpeed takes seconds to import and fixes its accelerator when imported: only engine
    # construction pays for it
    from deepspeed.utils import groups

    return groups


def reset_tensor_groups() -> None:
    """Forget the TP groups a previous engine in this process created."""
    g = _groups()
    g._TENSOR_MODEL_PARALLEL_GROUP = g._MODEL_PARALLEL_GROUP = g._DATA_PARALLEL_GROUP = None
    g._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = g._MPU_TENSOR_MODEL_PARALLEL_RANK = None


def tensor_groups(tp: int) -> Any:
    """Collective. DeepSpeed's groups module holding fresh data × tensor groups of size `tp`: the
    `mpu` for deepspeed.initialize (its batch arithmetic then counts data-parallel ranks only)."""
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel={tp}")
    reset_tensor_groups()
    g = _groups()
    # Explicit new_group calls rather than a DeviceMesh split: the same on gloo and NCCL.
    g._init_tp_groups_with_new_group(tensor_model_parallel_size=tp, data_parallel_size=world // tp)
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
