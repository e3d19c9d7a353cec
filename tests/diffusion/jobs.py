"""Diffusion trainings run on real ranks by tests.distributed.helper (many per process group)."""

from __future__ import annotations

import os
from typing import Any

from tests.distributed.jobs import MODES  # zero0..zero3 (and pp2, not for diffusion)


def overrides(shards: str, name: str, steps: int = 6) -> list[str]:
    """A 2-block DiT, fp32, grad accumulation 2 on 2 ranks, EMA decay low enough to move."""
    return ["task=diffusion", f"name={name}", f"data.paths=[{shards}]", "model.preset=dit-tiny", "model.dim=32",
            "model.depth=2", "model.heads=2", "batch.micro_batch=4", "batch.global_batch=16",
            "precision.dtype=fp32", "optimizer.lr=3e-3", "optimizer.warmup_steps=2", f"train.steps={steps}",
            "checkpoint.interval=3", "logging.interval=1", "logging.progress=false", "eval.batches=2",
            "diffusion.ema_decay=0.9"]


def _ema(trainer: Any) -> dict[str, Any]:
    ema = trainer.task_hook.state_dict()["ema"]  # collective: every rank's shard
    return {"ema_sum": float(ema["flat"].double().sum()), "ema_updates": ema["updates"]}


def train(args: list[str], resume: str = "auto") -> dict[str, Any]:
    from tests.distributed.jobs import train as run, train_records

    summary = run(args, resume, extra=_ema)
    summary["losses"] = [r["loss"] for r in train_records(summary["run_dir"])]
    return summary


def zero_modes(workdir: str, shards: str, modes: list[str]) -> dict[str, Any]:
    """Per ZeRO stage: 6 straight steps, and 3 steps + a new engine resuming + 3 steps."""
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for mode in modes:
        straight = train(overrides(shards, f"{mode}-straight") + MODES[mode])
        train(overrides(shards, f"{mode}-split") + MODES[mode] + ["debug.max_steps_this_run=3"])
        second = train(overrides(shards, f"{mode}-split") + MODES[mode])
        out[mode] = {"straight": straight, "second": second}
    return out


def world_change(workdir: str, shards: str, phase: str) -> dict[str, Any]:
    """phase first: 3 steps of 6 on this world; phase rest: resume them here; phase straight: 6 steps."""
    os.chdir(workdir)
    if phase == "straight":
        return train(overrides(shards, "world-straight") + MODES["zero2"])
    extra = ["debug.max_steps_this_run=3"] if phase == "first" else []
    return train(overrides(shards, "world") + MODES["zero2"] + extra)
