"""`task: diffusion`: a class-conditional DiT trained by the same Trainer, engine and checkpoints
as the LM (megalm/train/task.py's Task interface).

Its extra state — the sharded EMA of the weights — goes through the Trainer's generic `attach`
hook: saved in the client state of every checkpoint, restored on resume and on roll-back. Noise
needs no saved RNG: it is a function of (seed, global sample index) (see data.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from megalm.diffusion.data import ImageEvalLoader, ImageLoader, load_image_manifest, read_split, split_fingerprint
from megalm.diffusion.ema import ShardedEMA, load_flat
from megalm.diffusion.images import grid
from megalm.diffusion.objectives import build_objective, drop_labels
from megalm.diffusion.sample import generate
from megalm.errors import UserError
from megalm.models.dit import DiT, DiTConfig
from megalm.train.config import TrainConfig
from megalm.train.task import Batch, Task, TaskHook


class DiffusionTask(Task):
    name = "diffusion"
    model_config_class = DiTConfig

    def __init__(self, cfg: TrainConfig):
        self.cfg, d = cfg, cfg.diffusion
        src = cfg.source
        if len(cfg.data.paths) != 1 or cfg.data.weights is not None:
            raise UserError(f"{src}: data.paths: task diffusion takes exactly one image shard directory")
        if cfg.parallel.pipeline_stages != 1:
            raise UserError(f"{src}: parallel.pipeline_stages: task diffusion runs without pipeline stages (1)")
        self.manifest = load_image_manifest(cfg.data.paths[0])
        m = self.manifest
        if m.height != m.width:
            raise UserError(f"{m.path}: images are {m.width}x{m.height}; the DiT takes square images")
        fields = dict(cfg.model)
        for key, value in (("image_size", m.height), ("channels", m.channels), ("num_classes", m.num_classes)):
            if key in fields and fields[key] != value:
                raise UserError(f"{src}: model.{key}: {fields[key]} but the image shards have {value}")
            fields[key] = value
        self.model_config = DiTConfig.from_dict(fields, source=f"{src}: model")
        self.objective = build_objective(d, self.model_config.learn_sigma)
        # The trainer counts "tokens" per sample as data.seq_len: make that the DiT's patches.
        cfg.data.seq_len = self.model_config.tokens
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return DiT(self.model_config)

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return read_split(self.manifest, name, verify=self.cfg.data.verify)

    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> ImageLoader:
        px, lab = self._split(split)
        b = self.cfg.batch
        return ImageLoader(px, lab, self.cfg.data.seed, self.cfg.diffusion.class_dropout, b.global_batch,
                           b.micro_batch, dp_rank, dp_world, fingerprint=split_fingerprint(self.manifest, split))

    def build_eval_loader(self, dp_rank: int, dp_world: int) -> ImageEvalLoader:
        px, lab = self._split(self.cfg.data.eval_split)
        return ImageEvalLoader(px, lab, self.cfg.data.seed, self.cfg.batch.micro_batch, dp_rank, dp_world)

    def loss(self, model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor:
        y = drop_labels(batch["y"], batch["drop"], self.model_config.num_classes) if self.model_config.num_classes else None
        return self.objective.loss(model, batch["x0"], batch["noise"], batch["u"], y)

    def fingerprint(self) -> dict[str, Any]:
        return {"task": "diffusion", "shard_dirs": [os.path.abspath(p) for p in self.cfg.data.paths],
                "classes": list(self.manifest.classes), "model_config": self.model_config.to_dict()}

    def saved_model_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's model_config as trained (one saved before freq_shift existed used 0)."""
        return DiTConfig.from_saved(saved).to_dict()

    def attach(self, engine: Any, dp_rank: int, dp_world: int) -> "EMAHook":
        return EMAHook(self, engine, dp_rank, dp_world)


class EMAHook(TaskHook):
    """The Trainer's per-task extra state: after each applied step update the EMA shard;
    `state_dict`/`load_state_dict` travel in the checkpoint's client state."""

    carries_state = True

    def __init__(self, task: DiffusionTask, engine: Any, dp_rank: int, dp_world: int):
        self.task, self.engine = task, engine
        zero3 = task.cfg.parallel.zero_stage == 3
        self.ema = ShardedEMA(engine.module, task.cfg.diffusion.ema_decay, dp_rank, dp_world, zero3=zero3)
        self._writer = None

    def after_step(self, step: int, applied: bool) -> None:
        if applied:
            self.ema.update(self.engine.module)
        every = self.task.cfg.diffusion.grid_interval
        if every and step % every == 0:
            self.log_grid(step)

    def log_grid(self, step: int) -> None:
        """Collective: gather the EMA, rank 0 samples one row per class into TensorBoard."""
        flat = self.ema.state_dict()["flat"]
        if dist.is_initialized() and dist.get_rank() != 0:
            return

        model = DiT(self.task.model_config)
        load_flat(model, flat)
        d, mc = self.task.cfg.diffusion, self.task.model_config
        classes = max(mc.num_classes, 1)
        images = generate(model.eval(), self.task.objective, classes, 4, steps=d.grid_steps, guidance=d.grid_guidance)
        if self._writer is None:
            # TensorBoard's import takes about a second: only rank 0 writing a grid pays for it
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.task.cfg.tensorboard_dir())
        pic = grid(images, rows=classes, scale=max(1, 64 // mc.image_size))
        self._writer.add_image("samples/ema", pic, step, dataformats="HWC")
        self._writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
