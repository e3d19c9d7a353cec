"""Muon runs on real ranks (tests.distributed.test_muon): per ZeRO stage / pipeline / offload
mode, one step to read the applied update from, and 4 straight steps vs 2 + resume + 2."""

from __future__ import annotations

import os
from typing import Any

from tests.distributed.jobs import MODES as PLAIN_MODES
from tests.distributed.jobs import small_overrides, train, train_records

MUON = ["optimizer.name=muon", "optimizer.muon_lr=0.02"]
OFFLOAD = ["parallel.offload_optimizer=true"]
MODES = {**PLAIN_MODES,
         "pp2-zero0": ["parallel.zero_stage=0", "parallel.pipeline_stages=2"],
         "zero1-offload": PLAIN_MODES["zero1"] + OFFLOAD,
         "zero2-offload": PLAIN_MODES["zero2"] + OFFLOAD,
         "zero3-offload": PLAIN_MODES["zero3"] + OFFLOAD}
# ZeRO 1-3 would clip Muon's update instead of the gradient: the config refuses clipping there.
NO_CLIP = {mode: [] if mode in ("zero0", "pp2-zero0") else ["optimizer.grad_clip=0"] for mode in MODES}
# One plain step: constant LR, no decay, so the weight change IS -lr x the update.
ONE_STEP = ["optimizer.warmup_steps=0", "optimizer.schedule=constant", "optimizer.weight_decay=0",
            "optimizer.min_lr=0"]


def one_step_overrides(shards: str, mode: str) -> list[str]:
    return small_overrides(shards, f"muon-{mode}-one", steps=1) + MUON + ONE_STEP + MODES[mode] + NO_CLIP[mode]


def muon_modes(workdir: str, shards: str, modes: list[str], nan_modes: list[str]) -> dict[str, Any]:
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for mode in modes:
        one = train(one_step_overrides(shards, mode))
        base = small_overrides(shards, f"muon-{mode}-straight") + MUON + MODES[mode] + NO_CLIP[mode]
        straight = train(base)
        split = small_overrides(shards, f"muon-{mode}-split") + MUON + MODES[mode] + NO_CLIP[mode]
        first = train(split + ["debug.max_steps_this_run=2"])
        second = train(split)
        out[mode] = {"one_dir": os.path.abspath(one["run_dir"]), "straight": straight, "first": first, "second": second,
                     "straight_losses": [r["loss"] for r in train_records(straight["run_dir"])],
                     "split_losses": [r["loss"] for r in train_records(second["run_dir"])]}
    for mode in nan_modes:
        # ZeRO 2/3 fold the gradient into Muon's momentum during the reduction, before the guard
        # decides: a NaN step must still leave the momentum (and so every later step) finite.
        nan = train(small_overrides(shards, f"muon-{mode}-nan", steps=5) + MUON + MODES[mode] + NO_CLIP[mode]
                    + ["debug.nan_at_data_steps=[3]", "bad_steps.max_consecutive=3"])
        out[f"nan-{mode}"] = {"summary": nan, "records": train_records(nan["run_dir"])}
    return out
