"""DeepSpeed applied from outside: the plain model (or its layer list as a PipelineModule), the
optimizer, the LR schedule and `deepspeed.initialize`, all derived from the TrainConfig."""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megalm.train.config import TrainConfig
from megalm.train.ds_config import to_deepspeed_config
from megalm.train.guard import GuardedAdamW, StepGuard
from megalm.train.muon import guarded_muon, muon_param_groups
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


class _Use(nn.Module):
    """LayerSpec wants a class to instantiate; this one hands back an existing module."""

    def __new__(cls, module: nn.Module) -> nn.Module:  # type: ignore[misc]
        return module


def init_distributed() -> tuple[int, int]:
    """Start the process group from whatever launcher started us (torchrun, mpirun, srun)."""
    from launcher.diagnose import install_stack_dump
    from launcher.env import discover, set_accelerator_default

    install_stack_dump()  # SIGUSR2: every thread's stack to the log; the rank keeps running
    accel = set_accelerator_default()
    env = discover()
    env.export()
    import deepspeed

    _quiet_deepspeed()
    if not dist.is_initialized():
        # A dead or stuck peer fails the collective after env.timeout_s instead of hanging the job.
        deepspeed.init_distributed(dist_backend="nccl" if accel == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=env.timeout_s))
    if accel == "cuda":
        torch.cuda.set_device(env.local_rank)
    return dist.get_rank(), dist.get_world_size()


def _quiet_deepspeed() -> None:
    """Our loop prints one line per interval; DeepSpeed's INFO chatter and torch's deprecation
    notices about collectives DeepSpeed calls would bury it."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*c10d::broadcast_: an autograd kernel was not registered.*")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # nanoGPT's rule: matrices (incl. embeddings) decay; norms and biases do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups


def _pipeline_module(cfg: TrainConfig, task: Task, model: nn.Module, guard: StepGuard) -> nn.Module:
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    layers: list[Any] = list(task.pipeline_layers(model))
    first, last = layers[0], layers[-1]
    # A last layer with its own `loss` (megalm's HeadPipe with fused_loss) outputs hidden states and
    # projects inside the chunked fused CE, so [B, T, V] logits never exist on the last stage.
    head_loss = getattr(last, "loss", None) or task.pipeline_loss
    shared = {id(p) for p in first.parameters()} & {id(p) for p in last.parameters()}
    if shared:
        # Tied embedding/head on different stages: DeepSpeed all-reduces the tied weight's grads
        # across the owning stages when both ends are TiedLayerSpecs with one key.
        def attr_of(module: nn.Module) -> str:
            return next(n for n, p in module.named_parameters() if id(p) in shared)

        layers[0] = TiedLayerSpec("tied_embedding", _Use, first, tied_weight_attr=[attr_of(first)])
        layers[-1] = TiedLayerSpec("tied_embedding", _Use, last, tied_weight_attr=[attr_of(last)])

    def loss_fn(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return guard.record(head_loss(outputs, labels))

    return PipelineModule(layers=layers, num_stages=cfg.parallel.pipeline_stages, loss_fn=loss_fn,
                          partition_method="parameters")


def build(cfg: TrainConfig, task: Task, guard: StepGuard, world_size: int) -> Built:
    import deepspeed

    from launcher.env import set_accelerator_default

    cfg.validate_accelerator(set_accelerator_default())
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = task.build_model()
    flops = int(model.flops_per_token(cfg.data.seq_len)) if hasattr(model, "flops_per_token") else 0
    pipeline = cfg.parallel.pipeline_stages > 1
    module = _pipeline_module(cfg, task, model, guard) if pipeline else model
    o = cfg.optimizer
    if o.name == "muon":
        optimizer = guarded_muon(muon_param_groups(model, o, module), guard.decide)
    else:
        optimizer = GuardedAdamW(_param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
        optimizer.guard_decide = guard.decide
    if not pipeline:
        # A PipelineEngine built earlier in this process leaves its grid in DeepSpeed's module
        # globals; a plain engine would otherwise inherit that model-parallel layout.
        from deepspeed.utils import groups

        groups.mpu = None
    if cfg.parallel.zero_stage == 0 and cfg.precision.dtype == "bf16" and not pipeline and dist.get_rank() == 0:
        print("warning: parallel.zero_stage: 0 in bf16 runs DeepSpeed's unfused bf16 optimizer wrapper, which "
              "checks and norms every parameter with a host read per step (~2x the kernels of ZeRO-1, "
              "benchmarks/opcount_cpu.py); parallel.zero_stage=1 holds the same weights and gradients per GPU "
              "and less optimizer state", file=sys.stderr, flush=True)
    total = cfg.total_steps()
    ds_config = to_deepspeed_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: LRSchedule(opt, total, o),
    )
    if cfg.megalm_grad_norm():
        _clip_with_guard_norm(engine.optimizer, guard)
    if pipeline:
        dp_rank, dp_world = engine.grid.data_parallel_id, engine.grid.data_parallel_size
        is_first = engine.is_first_stage()
    else:
        dp_rank, dp_world, is_first = dist.get_rank(), world_size, True
    return Built(engine, pipeline, dp_rank, dp_world, is_first, flops)


def _clip_with_guard_norm(zero_optimizer: Any, guard: StepGuard) -> None:
    """ZeRO-1/2/3: DeepSpeed clips with the global norm the guard already has (a host float)
    instead of taking its own: a norm kernel per parameter and a host read per step."""
    # A CPU tensor: DeepSpeed's validity check and clip factor then never read the device.
    def norm(*_: Any) -> torch.Tensor:
        return torch.tensor(guard.grad_norm, dtype=torch.float32)

    if callable(getattr(zero_optimizer, "scaled_global_norm", None)) and hasattr(zero_optimizer, "bit16_groups"):
        zero_optimizer.scaled_global_norm = norm  # ZeRO-1/2: the global norm of all groups
    elif callable(getattr(zero_optimizer, "_get_norm_groups", None)):
        zero_optimizer._get_norm_groups = lambda: [norm()]  # ZeRO-3: per-group norms, L2-combined
    else:
        raise RuntimeError(f"{type(zero_optimizer).__name__} has neither scaled_global_norm() nor _get_norm_groups(): "
                           f"this DeepSpeed version clips differently; megalm's gradient norm needs updating for it")


def local_grad_sumsq(engine: Any) -> torch.Tensor:
    """ZeRO-1/2/3, after the accumulation boundary's backward: this rank's share of the squared
    gradient norm. DeepSpeed's ZeRO optimizer then holds the reduced gradients of this rank's
    partition in `averaged_gradients` (group -> tensors; its backward epilogue has waited for the
    reduction stream); partitions are disjoint across ranks, so
    the guard's all_reduce sums the shares to the global value. One multi-tensor norm, fp32."""
    groups = getattr(engine.optimizer, "averaged_gradients", None)
    if not isinstance(groups, dict):
        raise RuntimeError(f"{type(engine.optimizer).__name__} has no averaged_gradients dict: this DeepSpeed "
                           f"version keeps ZeRO gradients elsewhere; megalm's inf/NaN gradient check needs them")
    grads = [g for gs in groups.values() if gs for g in gs if g is not None and g.numel()]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device_of(engine))
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


def device_of(engine: Any) -> torch.device:
    return torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:  # CPU: this process's peak resident set
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")

