"""Rank function for test_grad_check.py (run on 2 gloo ranks by tests.distributed.helper)."""

from __future__ import annotations

import gc
import math
import os
from typing import Any


def nonfinite_gradient(workdir: str, shards: str) -> dict[str, Any]:
    """bf16 ZeRO-0/1/2/3 (DeepSpeed's own overflow check and norm off, megalm's norm on): a NaN gradient on
    rank 0 only, with every loss finite, skips the step on both ranks and changes no weight."""
    import torch
    import torch.distributed as dist

    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from megalm.train.task import build_task
    from tests.distributed.jobs import small_overrides

    os.chdir(workdir)
    out: dict[str, Any] = {}
    for zero in (0, 1, 2, 3):
        over = small_overrides(shards, f"nan-grad-z{zero}") + [f"parallel.zero_stage={zero}", "precision.dtype=bf16"]
        cfg = load_config(None, over, world_size=dist.get_world_size())
        t = Trainer(cfg, build_task(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
        try:
            steps = []
            for poison in (False, True, False):
                param = next(p for p in t.engine.module.parameters() if len(getattr(p, "ds_shape", p.shape)) == 2)
                hook = (param.register_hook(lambda g: g * float("nan"))
                        if poison and dist.get_rank() == 0 else None)
                before = t.weights_digest()
                t.train_step(t.next_batch())
                if hook is not None:
                    hook.remove()
                steps.append({"bad": t.guard.last_bad, "loss_finite": math.isfinite(t.guard.last_loss),
                              "grad_norm_finite": math.isfinite(t.guard.grad_norm),
                              "weights_changed": t.weights_digest() != before})
            out[f"zero{zero}"] = {"steps": steps, "ds_check": getattr(t.engine.optimizer, "check_grad_overflow", False),
                                  "skipped": t.guard.skipped_total}
        finally:
            t.close()
            del t
            gc.collect()
            torch.manual_seed(0)
    return out
