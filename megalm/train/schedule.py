"""Learning-rate schedules: linear warmup, then cosine / linear / WSD (warmup-stable-decay) / constant."""

from __future__ import annotations

import math
from typing import Any

import torch

from megalm.train.config import OptimizerSection


def lr_at(step: int, total_steps: int, opt: OptimizerSection) -> float:
    """LR for optimizer step `step` (0-based: the step about to be taken)."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    if opt.schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * opt.decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return opt.lr
        frac = min(1.0, (step - decay_start + 1) / decay_steps)
        return opt.lr - (opt.lr - opt.min_lr) * frac
    span = max(1, total_steps - opt.warmup_steps)
    frac = min(1.0, max(0.0, (step - opt.warmup_steps) / span))
    if opt.schedule == "linear":
        return opt.lr - (opt.lr - opt.min_lr) * frac
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * frac))


class LRSchedule:
    """Sets the LR of every param group from the step count (times the group's `lr_scale`, e.g.
    Muon's peak LR over AdamW's); DeepSpeed calls `step()` after each applied optimizer step and
    saves/loads `state_dict()` with its checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, opt: OptimizerSection):
        self.optimizer, self.total_steps, self.opt = optimizer, total_steps, opt
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step, self.total_steps, self.opt)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, *_: Any, **__: Any) -> None:
        self.last_step += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
