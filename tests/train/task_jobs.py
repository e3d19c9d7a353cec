"""Rank function for test_task.py: a task written against megalm.train.task.Task alone (abstract
methods only, every hook left at its default) trains, checkpoints and resumes through the Trainer."""

from __future__ import annotations

import gc
import os
from typing import Any, Iterator

import torch
import torch.nn as nn

from megalm.train.task import Batch, Task


class _Lines:
    """Random (x, y = x @ w_true) regression batches; the position is the state."""

    def __init__(self, micro: int, per_step: int, seed: int, dp_rank: int):
        self.micro, self.per_step, self.seed, self.dp_rank, self.step = micro, per_step, seed, dp_rank, 0

    def _batch(self, step: int, i: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + i * 7 + self.dp_rank)
        x = torch.randn(self.micro, 8, generator=g)
        return {"x": x, "y": x @ torch.arange(8.0).unsqueeze(1) / 8}

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            self.step += 1
            yield [self._batch(self.step, i) for i in range(self.per_step)]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def skip(self, n: int) -> None:
        self.step += n

    def source_weights(self) -> list[float]:
        return [1.0]


class _Eval:
    num_sources = 1

    def __init__(self, lines: _Lines):
        self.lines = lines

    def source_batches(self, k: int) -> Iterator[Batch]:
        for i in range(2):
            yield self.lines._batch(10_000, i)


class Regression(Task):
    """y = x·w by least squares: no tokenizer, no pipeline, no task state."""

    name = "regression"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def _lines(self, dp_rank: int, dp_world: int) -> _Lines:
        b = self.cfg.batch
        return _Lines(b.micro_batch, b.global_batch // (b.micro_batch * dp_world), self.cfg.data.seed, dp_rank)

    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> _Lines:
        return self._lines(dp_rank, dp_world)

    def build_eval_loader(self, dp_rank: int, dp_world: int) -> _Eval:
        return _Eval(self._lines(dp_rank, dp_world))

    def loss(self, model, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def fingerprint(self) -> dict[str, Any]:
        return {"task": self.name}


def regression(workdir: str, shards: str) -> dict[str, Any]:
    """4 straight steps; then 2 steps, a new Trainer resuming, 2 more."""
    import torch.distributed as dist

    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from tests.distributed.jobs import small_overrides, train_records

    os.chdir(workdir)
    out: dict[str, Any] = {}
    for run, extra in (("straight", []), ("first", ["debug.max_steps_this_run=2"]), ("second", [])):
        name = "straight" if run == "straight" else "split"
        cfg = load_config(None, small_overrides(shards, name) + ["eval.batches=2", "eval.interval=2"] + extra,
                          world_size=dist.get_world_size())
        trainer = Trainer(cfg, Regression(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
        resumed = trainer.resume("auto")
        summary = trainer.run()
        out[run] = {"resumed": resumed, "summary": summary,
                    "losses": [r["loss"] for r in train_records(str(cfg.run_dir()))]}
        del trainer
        gc.collect()
    return out
