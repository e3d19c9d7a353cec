"""Diffusion trainings run on real ranks by tests.distributed.helper (many per process group)."""

from __future__ import annotations

import gc
import json
import os
from typing import Any

ZERO = {f"zero{s}": [f"parallel.zero_stage={s}"] for s in range(4)}


def overrides(shards: str, name: str, steps: int = 6) -> list[str]:
    """A 2-block DiT, fp32, grad accumulation 2 on 2 ranks, EMA decay low enough to move."""
    return ["task=diffusion", f"name={name}", f"data.paths=[{shards}]", "model.preset=dit-tiny", "model.dim=32",
            "model.depth=2", "model.heads=2", "batch.micro_batch=4", "batch.global_batch=16",
            "precision.dtype=fp32", "optimizer.lr=3e-3", "optimizer.warmup_steps=2", f"train.steps={steps}",
            "checkpoint.interval=3", "logging.interval=1", "logging.progress=false", "eval.batches=2",
            "diffusion.ema_decay=0.9"]


def train(args: list[str], resume: str = "auto") -> dict[str, Any]:
    import torch.distributed as dist

    from megalm.diffusion.task import DiffusionTask
    from megalm.train.config import load_config
    from megalm.train.loop import Trainer

    cfg = load_config(None, args, world_size=dist.get_world_size())
    trainer = Trainer(cfg, DiffusionTask(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
    trainer.resume(resume)
    summary = trainer.run()
    ema = trainer.task_hook.state_dict()["ema"]
    summary.update(run_dir=str(cfg.run_dir()), ema_sum=float(ema["flat"].double().sum()),
                   ema_updates=ema["updates"], losses=_losses(str(cfg.run_dir())))
    del trainer
    gc.collect()
    return summary


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def zero_modes(workdir: str, shards: str, modes: list[str]) -> dict[str, Any]:
    """Per ZeRO stage: 6 straight steps, and 3 steps + a new engine resuming + 3 steps."""
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for mode in modes:
        straight = train(overrides(shards, f"{mode}-straight") + ZERO[mode])
        train(overrides(shards, f"{mode}-split") + ZERO[mode] + ["debug.max_steps_this_run=3"])
        second = train(overrides(shards, f"{mode}-split") + ZERO[mode])
        out[mode] = {"straight": straight, "second": second}
    return out


def world_change(workdir: str, shards: str, phase: str) -> dict[str, Any]:
    """phase first: 3 steps of 6 on this world; phase rest: resume them here; phase straight: 6 steps."""
    os.chdir(workdir)
    if phase == "straight":
        return train(overrides(shards, "world-straight") + ZERO["zero2"])
    extra = ["debug.max_steps_this_run=3"] if phase == "first" else []
    return train(overrides(shards, "world") + ZERO["zero2"] + extra)
