"""Single-process reference: the same model, data, optimizer and schedule in a plain PyTorch
loop (no DeepSpeed), to check every parallel layout against."""

from __future__ import annotations

import torch

from megalm.ops import FusedAdamW
from megalm.train.config import load_config
from megalm.train.schedule import lr_at
from megalm.train.task import LMTask


def reference_run(overrides: list[str], grad_norms: list[float] | None = None) -> tuple[list[float], torch.nn.Module]:
    """(per-step mean losses, final model); `grad_norms` collects each step's norm before clipping."""
    cfg = load_config(None, overrides, world_size=1)
    task = LMTask(cfg)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model()
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = FusedAdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
                     lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    loader = task.build_loader("train", 0, 1)
    losses = []
    for step in range(cfg.total_steps()):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.total_steps(), o)
        micro = next(loader)
        total = 0.0
        for mb in micro:
            loss = task.loss(model, mb)
            (loss / len(micro)).backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        if grad_norms is not None:
            grad_norms.append(float(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(micro))
    return losses, model
