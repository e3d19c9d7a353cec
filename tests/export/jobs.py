"""Checkpoints to export, trained on 2 real gloo ranks (run by tests.distributed.helper)."""

from __future__ import annotations

import gc
import os
from typing import Any

from tests.distributed.jobs import MODES, SEQUENCE_MODEL, TENSOR_MODES, small_overrides, train

# ZeRO-3 with an untied head; a 2-stage pipeline with tied embeddings (the head's copy of the
# embedding lives on the last stage).
LAYOUTS: dict[str, list[str]] = {
    "zero3": MODES["zero3"],
    "pp2": MODES["pp2"] + ["model.tie_embeddings=true"],
    # bf16 training: DeepSpeed names the files bf16_zero_pp_rank_*; the export defaults to bf16.
    "zero1-bf16": MODES["zero1"] + ["precision.dtype=bf16"],
    # Tensor parallelism: each rank's files hold its slices; the export puts them together.
    "tp2": TENSOR_MODES["tp2-zero2"] + SEQUENCE_MODEL,
}
# Parameters frozen during training (as LoRA freezes its base weights): DeepSpeed keeps them out of
# the flat partitions, in `frozen_param_fragments`.
FROZEN = ("layers.0.attention.wq.weight", "norm.weight")


def _train_frozen(overrides: list[str]) -> str:
    import torch.distributed as dist

    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from megalm.train.task import build_task

    cfg = load_config(None, overrides, world_size=dist.get_world_size())
    task = build_task(cfg)
    build = task.build_model

    def build_frozen():
        model = build()
        for name, p in model.named_parameters():
            p.requires_grad_(name not in FROZEN)
        return model

    task.build_model = build_frozen
    trainer = Trainer(cfg, task, rank=dist.get_rank(), world_size=dist.get_world_size())
    trainer.resume("auto")
    trainer.run()
    del trainer
    gc.collect()
    return str(cfg.run_dir())


def make_checkpoints(workdir: str, shards: str) -> dict[str, Any]:
    os.chdir(workdir)
    runs = {name: os.path.abspath(train(small_overrides(shards, name, steps=2) + extra)["run_dir"])
            for name, extra in LAYOUTS.items()}
    for mode in ("zero2", "zero3"):
        runs[f"{mode}-frozen"] = os.path.abspath(_train_frozen(small_overrides(shards, f"{mode}-frozen", steps=2)
                                                               + MODES[mode]))
    return runs


def sft_from_import(workdir: str, overrides: list[str]) -> dict[str, Any]:
    """Full finetuning and LoRA (ZeRO-3) from an imported checkpoint, 2 steps each: the step losses."""
    from tests.distributed.jobs import train_records

    os.chdir(workdir)
    out = {}
    for name, extra in (("full", []), ("lora", ["lora.rank=4", "lora.alpha=8", "lora.targets=[wq,wv,w1]"])):
        summary = train([*overrides, f"name=import-{name}", *extra])
        out[name] = {"step": summary["step"], "run_dir": os.path.abspath(summary["run_dir"]),
                     "losses": [r["loss"] for r in train_records(summary["run_dir"])]}
    return out
