"""SFT trainings run on 2 real gloo ranks by tests.distributed.helper (one process group)."""

from __future__ import annotations

import os
from typing import Any

from tests.distributed.jobs import MODES, small_overrides, train, train_records

MODEL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1"]


def sft_overrides(shards: str, name: str, steps: int, init_from: str, extra: list[str]) -> list[str]:
    """The small_overrides model finetuned on SFT shards: fp32, grad accumulation 2 on 2 ranks."""
    return ["task=sft", f"name={name}", f"data.paths=[{shards}]", "data.seq_len=96", *MODEL,
            "batch.micro_batch=2", "batch.global_batch=8", "precision.dtype=fp32", "optimizer.lr=1e-2",
            "optimizer.min_lr=1e-3", "optimizer.warmup_steps=2", "optimizer.weight_decay=0", f"train.steps={steps}",
            "checkpoint.interval=4", "logging.interval=1", "logging.progress=false", "eval.batches=0",
            f"checkpoint.init_from={init_from}", *extra]


def _run(args: list[str]) -> dict[str, Any]:
    summary = train(args)
    summary["losses"] = [r["loss"] for r in train_records(summary["run_dir"])]
    return summary


def straight_and_split(shards: str, name: str, steps: int, init_from: str, extra: list[str]) -> dict[str, Any]:
    straight = _run(sft_overrides(shards, f"{name}-straight", steps, init_from, extra))
    _run(sft_overrides(shards, f"{name}-split", steps, init_from, extra + [f"debug.max_steps_this_run={steps // 2}"]))
    split = _run(sft_overrides(shards, f"{name}-split", steps, init_from, extra))
    return {"straight": straight, "split": split}


def sft_runs(workdir: str, text: str, sft: str) -> dict[str, Any]:
    """A base LM (ZeRO-2, 2 steps), then from its weights: full finetuning under ZeRO-3 and LoRA
    under ZeRO-3, each 8 straight steps and 4 + resume + 4."""
    os.chdir(workdir)
    base = train(small_overrides(text, "base", steps=2) + MODES["zero2"])
    init = os.path.abspath(base["run_dir"])
    full = straight_and_split(sft, "full", 8, init, MODES["zero3"])
    lora = straight_and_split(sft, "lora", 8, init, MODES["zero3"] + [
        "lora.rank=4", "lora.alpha=8", "lora.targets=[wq,wv,w1,w2,w3]", "optimizer.lr=3e-2"])
    return {"base": base, "full": full, "lora": lora}
