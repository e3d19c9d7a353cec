"""Run on 2 real gloo ranks: build megalm's DeepSpeed engine for each (dtype, ZeRO stage, tensor
parallel, sequence parallel) and measure what this rank really holds after one step: parameter
bytes (ZeRO-3: its partition; TP: its slices) and optimizer-state bytes (fp32 master partition +
AdamW moments of the inner optimizer)."""

from __future__ import annotations

import gc
import os
from typing import Any


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _measure(engine, zero: int) -> dict[str, int]:
    import torch

    params = 0
    for p in engine.module.parameters():
        params += _tensor_bytes(p.ds_tensor) if zero == 3 and hasattr(p, "ds_tensor") else _tensor_bytes(p)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO / BF16 wrappers hold the torch optimizer inside
    # ZeRO-3 detaches its fp32 partitions from the inner optimizer's groups between steps.
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or
                   [p for group in inner.param_groups for p in group["params"]])
    optim, seen = 0, set()
    for p in masters:
        state = inner.state.get(p, {})
        moments = sum(_tensor_bytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        optim += moments
        # The master copy is a separate tensor unless the optimizer updates the model's own params.
        if id(p) not in seen and not any(p is q for q in engine.module.parameters()):
            optim += _tensor_bytes(p)
        seen.add(id(p))
    return {"params": params, "optim": optim, "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                                for p in engine.module.parameters())}


def measure(workdir: str, shards: str, cases: list[list[Any]]) -> dict[str, Any]:
    import torch.distributed as dist

    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from megalm.train.task import LMTask
    from tests.distributed.jobs import small_overrides

    os.chdir(workdir)
    out = {}
    for dtype, zero, tp, sp in cases:
        name = f"{dtype}-z{zero}-tp{tp}-sp{sp}"
        over = small_overrides(shards, name, steps=1) + [
            f"precision.dtype={dtype}", f"parallel.zero_stage={zero}", "model.dim=128", "model.n_layers=4",
            "model.n_heads=4", "model.n_kv_heads=2", f"parallel.tensor_parallel={tp}",
            f"parallel.sequence_parallel={sp}"]
        cfg = load_config(None, over, world_size=dist.get_world_size())
        trainer = Trainer(cfg, LMTask(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
        trainer.train_step(trainer.next_batch())
        out[name] = _measure(trainer.engine, zero) | {"dtype": dtype, "zero": zero, "tp": tp, "sp": sp,
                                                      "skipped": trainer.guard.skipped_total,
                                                      "model": trainer.task.fingerprint()["model_config"]}
        trainer.close()
        del trainer
        gc.collect()
    return out
