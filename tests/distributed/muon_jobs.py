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
         "zero3-offload": PLAIN_MODES["zero3"] + OFFLOAD,
         "zero1-bf16": PLAIN_MODES["zero1"] + ["precision.dtype=bf16"]}
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


def _save_momenta(path: str, zero: bool = False):
    """A hook saving every Muon matrix's momentum (whole, by name) on rank 0; `zero` then wipes
    the live momentum (the counterfactual of a resume that lost it)."""
    def hook(trainer) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from megalm.engine.muon_universal import momenta

        found = momenta(trainer.engine)
        if dist.get_rank() == 0:
            torch.save(found, path)
        if zero:
            opt = trainer.engine.optimizer
            base = getattr(opt, "optimizer", opt)
            for state in base.state.values():
                if "momentum_buffer" in state:
                    state["momentum_buffer"].zero_()
        return {}
    return hook


def world_change(workdir: str, shards: str, phase: str, modes: list[str]) -> dict[str, Any]:
    """Muon across a DP-size change, in three launches, per mode: "a" (2 ranks) trains run `x` 2 of
    4 steps and `x-straight` all 4; "b" (1 rank) resumes `x` (2 -> 1), resumes a copy with the
    momentum wiped, trains `y` 2 of 4 steps and `y-straight` all 4; "c" (2 ranks) resumes `y`
    (1 -> 2). Momenta go to <mode>-<run>-saved.pt (at the stop) and -loaded.pt (after the resume)."""
    import shutil

    import torch.distributed as dist

    os.chdir(workdir)
    out: dict[str, Any] = {}
    half = ["debug.max_steps_this_run=2"]
    for mode in modes:
        def cfg(run: str) -> list[str]:
            return small_overrides(shards, f"{mode}-{run}") + MUON + MODES[mode] + NO_CLIP[mode]

        def at(run: str, what: str) -> str:
            return f"{mode}-{run}-{what}.pt"

        if phase == "a":
            out[f"{mode}-x-first"] = train(cfg("x") + half, extra=_save_momenta(at("x", "saved")))
            if dist.get_rank() == 0:
                shutil.copytree(f"runs/{mode}-x", f"runs/{mode}-x-wiped")
            dist.barrier()
            out[f"{mode}-x-straight"] = train(cfg("x-straight"))
        elif phase == "b":
            out[f"{mode}-x"] = train(cfg("x"), after_resume=_save_momenta(at("x", "loaded")))
            out[f"{mode}-x-wiped"] = train(cfg("x-wiped"), after_resume=_save_momenta(at("x", "wiped"), zero=True))
            out[f"{mode}-y-first"] = train(cfg("y") + half, extra=_save_momenta(at("y", "saved")))
            out[f"{mode}-y-straight"] = train(cfg("y-straight"))
        else:
            out[f"{mode}-y"] = train(cfg("y"), after_resume=_save_momenta(at("y", "loaded")))
    for summary in out.values():
        summary["losses"] = [r["loss"] for r in train_records(summary["run_dir"])]
    return out
