"""Functions run on real ranks by tests.distributed.helper (several trainings per launch: a
2-rank DeepSpeed start costs ~10 s, so each job builds many engines in one process group)."""

from __future__ import annotations

import gc
import json
import os
from typing import Any, Callable

MODES: dict[str, list[str]] = {
    "zero0": ["parallel.zero_stage=0"],
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
    "pp2": ["parallel.zero_stage=1", "parallel.pipeline_stages=2"],
}
# bf16: ZeRO-0 (megalm's AdamW with fp32 masters) beside ZeRO-1 (DeepSpeed's ZeRO optimizer).
BF16_MODES: dict[str, list[str]] = {f"{m}-bf16": MODES[m] + ["precision.dtype=bf16"] for m in ("zero0", "zero1")}
STRAIGHT_ONLY = {"zero1-bf16"}  # the comparison curve; its resume is held by the bf16 TP/SP and export tests


def small_overrides(shards: str, name: str, steps: int = 4) -> list[str]:
    """A 2-layer model, fp32, grad accumulation 2 on 2 ranks (4 on a 2-stage pipeline)."""
    return [f"name={name}", f"data.paths=[{shards}]", "data.seq_len=32", "model.dim=32", "model.n_layers=2",
            "model.n_heads=2", "model.n_kv_heads=1", "batch.micro_batch=2", "batch.global_batch=8",
            "precision.dtype=fp32", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "optimizer.warmup_steps=2",
            f"train.steps={steps}", "checkpoint.interval=2", "logging.interval=1", "logging.progress=false",
            "eval.batches=0"]


def train(overrides: list[str], resume: str = "auto",
          extra: Callable[[Any], dict[str, Any]] | None = None,
          after_resume: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """One in-process training run (of the task `task=` names) on the current process group;
    returns its summary, plus what `extra(trainer)` adds (collective calls allowed);
    `after_resume(trainer)` runs between the resume and the first step."""
    import torch.distributed as dist

    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from megalm.train.task import build_task

    cfg = load_config(None, overrides, world_size=dist.get_world_size())
    trainer = Trainer(cfg, build_task(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
    trainer.resume(resume)
    if after_resume is not None:
        after_resume(trainer)
    summary = trainer.run()
    summary["run_dir"] = str(cfg.run_dir())
    if extra is not None:
        summary.update(extra(trainer))
    del trainer
    gc.collect()
    return summary


def train_records(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def train_modes(workdir: str, shards: str, modes: list[str]) -> dict[str, Any]:
    """Per mode: 4 straight steps, and 2 steps + a new engine resuming + 2 steps."""
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for mode in modes:
        over = {**MODES, **BF16_MODES}[mode]
        straight = train(small_overrides(shards, f"{mode}-straight") + over,
                         extra=lambda t: {"guard_reductions": t.guard.reductions})
        out[mode] = {"straight": straight,
                     "straight_losses": [r["loss"] for r in train_records(straight["run_dir"])],
                     "straight_grad_norms": [r["grad_norm"] for r in train_records(straight["run_dir"])]}
        if mode in STRAIGHT_ONLY:
            continue
        first = train(small_overrides(shards, f"{mode}-split") + over + ["debug.max_steps_this_run=2"])
        second = train(small_overrides(shards, f"{mode}-split") + over)
        out[mode].update(first=first, second=second,
                         split_losses=[r["loss"] for r in train_records(second["run_dir"])])
    return out


def nan_rollback(workdir: str, shards: str) -> dict[str, Any]:
    """Data batches 3..5 poisoned (NaN loss), 3 bad steps in a row roll back."""
    os.chdir(workdir)
    summary = train(small_overrides(shards, "nan", steps=6) + [
        "parallel.zero_stage=2", "debug.nan_at_data_steps=[3,4,5]", "bad_steps.max_consecutive=3"])
    return {"summary": summary, "records": train_records(summary["run_dir"])}


def modes_and_nan(workdir: str, shards: str, modes: list[str]) -> dict[str, Any]:
    return {"modes": train_modes(workdir, shards, modes), "nan": nan_rollback(workdir, shards)}


def _attempt(fn) -> dict[str, Any]:
    from megalm.errors import UserError

    try:
        return {"ok": True, "result": fn()}
    except UserError as exc:
        return {"ok": False, "error": str(exc)}


def trainer_checks(workdir: str, shards: str, no_valid_shards: str) -> dict[str, Any]:
    """On one rank: final save precedes the final eval; an impossible eval split fails at Trainer
    init; --resume none / an older checkpoint of a dir with checkpoints are refused; fp16 on CPU
    is refused; summary.json goes through megalm.fsio.atomic_write."""
    import torch.distributed as dist

    import megalm.train.loop as loop
    from megalm.checkpoint.layout import published_tags
    from megalm.train.config import load_config
    from megalm.train.task import LMTask

    os.chdir(workdir)
    out: dict[str, Any] = {}
    base = ["parallel.zero_stage=0", "checkpoint.interval=1", "checkpoint.keep_last=5"]

    written: list[str] = []
    real_write = loop.atomic_write
    loop.atomic_write = lambda path, text: (written.append(path), real_write(path, text))[1]
    try:
        out["ck"] = train(small_overrides(shards, "ck", steps=2) + base)
    finally:
        loop.atomic_write = real_write
    out["summary_writes"] = written
    ck_dir = os.path.abspath("runs/ck/checkpoints")
    out["ck_tags"] = published_tags(ck_dir)
    out["resume_none"] = _attempt(lambda: train(small_overrides(shards, "ck", steps=2) + base, resume="none"))
    out["resume_older"] = _attempt(lambda: train(small_overrides(shards, "ck", steps=2) + base,
                                                 resume=os.path.join(ck_dir, out["ck_tags"][0])))
    out["resume_newest"] = _attempt(lambda: train(small_overrides(shards, "ck", steps=2) + base,
                                                  resume=os.path.join(ck_dir, out["ck_tags"][-1]))["step"])
    os.makedirs("runs/other/checkpoints/step_00000001", exist_ok=True)  # (a missing path is refused first)
    out["resume_foreign"] = _attempt(lambda: train(small_overrides(shards, "ck", steps=2) + base,
                                                   resume=os.path.abspath("runs/other/checkpoints/step_00000001")))
    out["fp16_cpu"] = _attempt(lambda: train(small_overrides(shards, "fp16", steps=1) + ["precision.dtype=fp16"]))

    # An eval split with no shards: one line at Trainer init, nothing trained or saved.
    stage = []

    def bad_eval():
        cfg = load_config(None, small_overrides(no_valid_shards, "noeval", steps=2) + ["eval.batches=2"],
                          world_size=dist.get_world_size())
        trainer = loop.Trainer(cfg, LMTask(cfg), rank=dist.get_rank(), world_size=dist.get_world_size())
        stage.append("built")
        trainer.run()

    out["bad_eval"] = _attempt(bad_eval)
    out["bad_eval_stage"] = stage
    out["bad_eval_tags"] = published_tags(os.path.abspath("runs/noeval/checkpoints"))

    # The final eval fails: the last steps are saved already.
    class FailingEval(loop.Trainer):
        def evaluate(self) -> tuple[float, list[float]]:
            raise RuntimeError("eval failed")

    cfg = load_config(None, small_overrides(shards, "evalfail", steps=3) + ["checkpoint.interval=100",
                                                                            "eval.batches=1"],
                      world_size=dist.get_world_size())
    try:
        FailingEval(cfg, LMTask(cfg), rank=dist.get_rank(), world_size=dist.get_world_size()).run()
        out["evalfail"] = "no error"
    except RuntimeError as exc:
        out["evalfail"] = str(exc)
    out["evalfail_tags"] = published_tags(os.path.abspath("runs/evalfail/checkpoints"))
    gc.collect()
    return out


SEQUENCE_MODES: dict[str, list[str]] = {
    "sp2-zero1": ["parallel.zero_stage=1", "parallel.sequence_parallel=2"],
    "sp2-zero2": ["parallel.zero_stage=2", "parallel.sequence_parallel=2"],
    "sp2-zero3": ["parallel.zero_stage=3", "parallel.sequence_parallel=2"],
    "sp2-zero0": ["parallel.zero_stage=0", "parallel.sequence_parallel=2"],
    "sp2-zero1-bf16": ["parallel.zero_stage=1", "parallel.sequence_parallel=2", "precision.dtype=bf16"],
    # every block recomputed in backward: its all-to-alls run again there
    "sp2-zero1-ckpt": ["parallel.zero_stage=1", "parallel.sequence_parallel=2", "parallel.activation_checkpointing=true"],
}
SEQUENCE_MODEL = ["model.n_kv_heads=2"]  # both head counts split over 2 sequence-parallel ranks


def model_parallel(workdir: str, shards: str, modes: list[str], resume_modes: list[str],
                   handover: bool = False) -> dict[str, Any]:
    """Per mode of SEQUENCE_MODES / TENSOR_MODES: 4 straight steps; per mode of `resume_modes` also
    2 steps + a new engine resuming + 2 steps; then (`handover`) the layout changes of a checkpoint
    (tensor_handover, sequence_handover)."""
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for mode in modes:
        extra = (TENSOR_SEQUENCE_MODEL + TENSOR_SEQUENCE_MODES[mode] if mode in TENSOR_SEQUENCE_MODES
                 else SEQUENCE_MODEL + {**SEQUENCE_MODES, **TENSOR_MODES}[mode])
        straight = train(small_overrides(shards, f"{mode}-straight") + extra,
                         extra=lambda t: {"guard_reductions": t.guard.reductions, "dp": [t.b.dp_rank, t.b.dp_world]})
        out[mode] = {"straight": straight,
                     "straight_losses": [r["loss"] for r in train_records(straight["run_dir"])],
                     "straight_grad_norms": [r["grad_norm"] for r in train_records(straight["run_dir"])]}
        if mode in resume_modes:
            first = train(small_overrides(shards, f"{mode}-split") + extra + ["debug.max_steps_this_run=2"])
            second = train(small_overrides(shards, f"{mode}-split") + extra)
            out[mode].update(first=first, second=second,
                             split_losses=[r["loss"] for r in train_records(second["run_dir"])])
    if handover:
        out.update(tensor_handover(workdir, shards), sp_then_dp=sequence_handover(workdir, shards))
    return out


def sequence_handover(workdir: str, shards: str) -> dict[str, Any]:
    """A sequence-parallel checkpoint resumed as plain data parallelism (sequence_parallel=1)."""
    os.chdir(workdir)
    first = train(small_overrides(shards, "sp-then-dp") + SEQUENCE_MODEL + SEQUENCE_MODES["sp2-zero1"]
                  + ["debug.max_steps_this_run=2"])
    second = train(small_overrides(shards, "sp-then-dp") + SEQUENCE_MODEL + ["parallel.zero_stage=1"])
    return {"first": first, "second": second, "losses": [r["loss"] for r in train_records(second["run_dir"])]}


TENSOR_MODES: dict[str, list[str]] = {
    "tp2-zero0": ["parallel.zero_stage=0", "parallel.tensor_parallel=2"],
    "tp2-zero1": ["parallel.zero_stage=1", "parallel.tensor_parallel=2"],
    "tp2-zero2": ["parallel.zero_stage=2", "parallel.tensor_parallel=2"],
    "tp2-zero3": ["parallel.zero_stage=3", "parallel.tensor_parallel=2"],
    "tp2-zero1-bf16": ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "precision.dtype=bf16"],
    "tp2-zero0-bf16": ["parallel.zero_stage=0", "parallel.tensor_parallel=2", "precision.dtype=bf16"],
    "tp2-zero3-ckpt": ["parallel.zero_stage=3", "parallel.tensor_parallel=2", "parallel.activation_checkpointing=true"],
}
# Both at once (4 ranks: TP 2 × SP 2; on 8, also 2 data-parallel groups).
TENSOR_SEQUENCE_MODES: dict[str, list[str]] = {
    "tp2sp2-zero1": ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "parallel.sequence_parallel=2"],
    "tp2sp2-zero2-ckpt": ["parallel.zero_stage=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=2",
                          "parallel.activation_checkpointing=true"],
}
TENSOR_SEQUENCE_MODEL = ["model.n_heads=4", "model.n_kv_heads=4"]  # 4 heads: one per TP × SP rank


def tensor_handover(workdir: str, shards: str) -> dict[str, Any]:
    """2 steps at tensor_parallel=2 resumed for 2 more at 1 (ZeRO-1: universal conversion), and the
    other way round; a ZeRO-0 TP checkpoint refused at another TP size."""
    os.chdir(workdir)
    out: dict[str, Any] = {}
    for name, before, after in [("tp-then-dp", TENSOR_MODES["tp2-zero1"], ["parallel.zero_stage=1"]),
                                ("dp-then-tp", ["parallel.zero_stage=1"], TENSOR_MODES["tp2-zero1"])]:
        first = train(small_overrides(shards, name) + SEQUENCE_MODEL + before + ["debug.max_steps_this_run=2"])
        second = train(small_overrides(shards, name) + SEQUENCE_MODEL + after)
        out[name] = {"first": first, "second": second,
                     "losses": [r["loss"] for r in train_records(second["run_dir"])]}
    train(small_overrides(shards, "tp-zero0") + SEQUENCE_MODEL + TENSOR_MODES["tp2-zero0"]
          + ["debug.max_steps_this_run=2"])
    out["zero0_refused"] = _attempt(lambda: train(small_overrides(shards, "tp-zero0") + SEQUENCE_MODEL
                                                  + ["parallel.zero_stage=0"]))
    return out

