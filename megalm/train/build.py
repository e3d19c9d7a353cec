"""What the trainer runs on, derived from the TrainConfig: the plain model (or its layer list as
pipeline stages), the optimizer (asking the step guard before it updates), the LR schedule, and
the DeepSpeed engine megalm.engine builds around them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from launcher.env import set_accelerator_default
from megalm.errors import UserError
from megalm.engine.config import to_deepspeed_config
from megalm.engine.muon import guarded_muon
from megalm.engine.runtime import before_optimizer_step, clip_with_norm, data_parallel, initialize, pipeline_module
from megalm.engine.sequence import SequenceGroups
from megalm.engine.tensor import autotp_config, tensor_groups
from megalm.train.config import TrainConfig
from megalm.train.guard import GuardedAdamW, StepGuard
from megalm.train.muon import muon_param_groups
from megalm.train.schedule import LRSchedule
from megalm.train.task import Task


@dataclass
class Built:
    engine: Any  # DeepSpeedEngine or PipelineEngine
    pipeline: bool
    dp_rank: int
    dp_world: int
    is_first_stage: bool
    flops_per_token: int  # model FLOPs per trained token (computed before ZeRO-3 partitions params)
    tp_plan: dict[str, Any] | None = None  # tensor parallelism: which weights are split how (checkpoints)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # nanoGPT's rule: matrices (incl. embeddings) decay; norms and biases do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups


def _stages(cfg: TrainConfig, task: Task, model: nn.Module, guard: StepGuard) -> nn.Module:
    layers = list(task.pipeline_layers(model))
    head_loss = task.pipeline_loss(layers)

    def loss_fn(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return guard.record(head_loss(outputs, labels))

    return pipeline_module(layers, cfg.parallel.pipeline_stages, loss_fn)


def build(cfg: TrainConfig, task: Task, guard: StepGuard, world_size: int) -> Built:
    cfg.validate_accelerator(set_accelerator_default())
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = task.build_model()
    flops = task.flops_per_token(model)
    pipeline = cfg.parallel.pipeline_stages > 1
    ds_config = to_deepspeed_config(cfg, world_size)
    mpu: Any = None  # the model-parallel groups handed to DeepSpeed
    tp_plan = None
    tp, sp = cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel
    if tp > 1:  # DeepSpeed splits the model inside initialize
        mpu = tensor_groups(tp, sp)
        tp_plan = task.tensor_parallel_plan()
        ds_config["tensor_parallel"] = autotp_config(tp_plan)
        if sp > 1:
            task.apply_sequence_parallel(model, mpu.get_sequence_parallel_group())
    elif sp > 1:
        mpu = SequenceGroups(sp)
        task.apply_sequence_parallel(model, mpu.sp_group)
    module = _stages(cfg, task, model, guard) if pipeline else model
    master_weights = cfg.megalm_zero0() and cfg.precision.dtype == "bf16"
    if master_weights:
        # What DeepSpeed's bf16 mode would do, without its per-parameter wrapper: bf16 params
        # (buffers keep their dtype), fp32 masters and moments in the optimizer.
        for p in module.parameters():
            p.data = p.data.to(torch.bfloat16)
    o = cfg.optimizer
    if o.name == "muon":
        optimizer = guarded_muon(muon_param_groups(model, o, module), guard.skip_update)
    else:
        optimizer = GuardedAdamW(_param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, master_weights=master_weights)
        optimizer.skip_update = guard.skip_update
    total = cfg.total_steps()
    engine = initialize(module, optimizer, ds_config, lambda opt: LRSchedule(opt, total, o), pipeline, mpu=mpu)
    if cfg.megalm_grad_norm():
        clip_with_norm(engine.optimizer, lambda: guard.grad_norm)
    if pipeline:  # train_batch runs forward, backward and the optimizer inside DeepSpeed
        before_optimizer_step(engine, guard.decide)
    if mpu is not None:  # the ranks of a sequence- or tensor-parallel group read the same batches
        return Built(engine, pipeline, mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(), True, flops,
                     tp_plan)
    return Built(engine, pipeline, *data_parallel(engine, world_size, pipeline), flops)


ZERO0_OPTIMIZER = "zero0_optimizer"  # client-state key: who owns a ZeRO-0 checkpoint's optimizer state


def check_zero0_optimizer(cfg: TrainConfig, cs: dict[str, Any]) -> None:
    """Refuse, in one line, a ZeRO-0 checkpoint whose optimizer state megalm's ZeRO-0 cannot take:
    DeepSpeed's bf16 wrapper's (megalm before it stepped ZeRO-0 itself), or one of another
    precision (bf16 state holds fp32 masters, fp32 state none): DeepSpeed would fail deep in its
    load, or on a GPU step fp32 moments as bf16."""
    saved = cs.get("config", {})
    p = saved.get("parallel", {})
    if not cfg.megalm_zero0() or p.get("zero_stage") != 0 or int(p.get("pipeline_stages", 1)) != 1:
        return
    dtype = saved.get("precision", {}).get("dtype")
    init_from = "start a new run from its weights with checkpoint.init_from=<that checkpoint>"
    if cs.get(ZERO0_OPTIMIZER) != "megalm" and dtype != "fp32":
        raise UserError(f"parallel.zero_stage: this ZeRO-0 {dtype} checkpoint holds DeepSpeed's {dtype} optimizer "
                        f"wrapper state (saved by megalm {cs.get('megalm_version', '?')}), which megalm's ZeRO-0 no "
                        f"longer reads: resume it with the megalm that wrote it, or {init_from}")
    if dtype != cfg.precision.dtype:
        raise UserError(f"precision.dtype: this ZeRO-0 checkpoint was trained in {dtype}, whose optimizer state does "
                        f"not carry over to {cfg.precision.dtype}: resume with precision.dtype={dtype}, or {init_from}")
