"""DeepSpeed's runtime, touched here only: the process group, the engine (plain or pipeline),
gathered ZeRO-3 parameters, and the two places megalm's step guard reaches into ZeRO (its
gradient norm and the partition gradients it is taken from)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher.diagnose import install_stack_dump
from launcher.env import discover, set_accelerator_default
from megalm.engine.tensor import reset_tensor_groups
from megalm.engine.version import check_deepspeed


class _Use(nn.Module):
    """LayerSpec wants a class to instantiate; this one hands back an existing module."""

    def __new__(cls, module: nn.Module) -> nn.Module:  # type: ignore[misc]
        return module


def init_distributed() -> tuple[int, int]:
    """Start the process group from whatever launcher started us (torchrun, mpirun, srun)."""
    install_stack_dump()  # SIGUSR2: every thread's stack to the log; the rank keeps running
    accel = set_accelerator_default()
    env = discover()
    env.export()
    check_deepspeed()
    import deepspeed  # heavy (seconds): only a process that trains or converts pays for it

    quiet_deepspeed()
    if not dist.is_initialized():
        # A dead or stuck peer fails the collective after env.timeout_s instead of hanging the job.
        deepspeed.init_distributed(dist_backend="nccl" if accel == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=env.timeout_s))
    if accel == "cuda":
        torch.cuda.set_device(env.local_rank)
    return dist.get_rank(), dist.get_world_size()


def quiet_deepspeed() -> None:
    """Our loop prints one line per interval; DeepSpeed's INFO chatter and torch's deprecation
    notices about collectives DeepSpeed calls would bury it."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*c10d::broadcast_: an autograd kernel was not registered.*")


def pipeline_module(layers: list[nn.Module], stages: int,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    """The layer list as DeepSpeed's PipelineModule, partitioned by parameter count."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    specs: list[Any] = list(layers)
    first, last = specs[0], specs[-1]
    shared = {id(p) for p in first.parameters()} & {id(p) for p in last.parameters()}
    if shared:
        # Tied embedding/head on different stages: DeepSpeed all-reduces the tied weight's grads
        # across the owning stages when both ends are TiedLayerSpecs with one key.
        def attr_of(module: nn.Module) -> str:
            return next(n for n, p in module.named_parameters() if id(p) in shared)

        specs[0] = TiedLayerSpec("tied_embedding", _Use, first, tied_weight_attr=[attr_of(first)])
        specs[-1] = TiedLayerSpec("tied_embedding", _Use, last, tied_weight_attr=[attr_of(last)])
    return PipelineModule(layers=specs, num_stages=stages, loss_fn=loss_fn, partition_method="parameters")


def initialize(module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
               lr_scheduler: Callable[[torch.optim.Optimizer], Any], pipeline: bool, mpu: Any = None) -> Any:
    """deepspeed.initialize; returns the DeepSpeedEngine (or PipelineEngine). `mpu`: the process
    groups of model parallelism (megalm.engine.sequence.SequenceGroups), None for plain DP."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    import deepspeed

    if not pipeline:
        # A PipelineEngine built earlier in this process leaves its grid in DeepSpeed's module
        # globals; a plain engine would otherwise inherit that model-parallel layout.
        from deepspeed.utils import groups

        groups.mpu = None
        if mpu is not groups:  # an engine without tensor parallelism after one with it
            reset_tensor_groups()
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler, mpu=mpu)
    return engine


def data_parallel(engine: Any, world_size: int, pipeline: bool) -> tuple[int, int, bool]:
    """(data-parallel rank, data-parallel size, is this rank on the first pipeline stage)."""
    if pipeline:
        return engine.grid.data_parallel_id, engine.grid.data_parallel_size, engine.is_first_stage()
    return dist.get_rank(), world_size, True


def before_optimizer_step(pipeline_engine: Any, hook: Callable[[], Any]) -> None:
    """A PipelineEngine runs a whole step inside train_batch: call `hook` on every rank after the
    last backward of the step, right before its optimizer step (DeepSpeed's OptimizerStep
    instruction goes through `_take_model_step`, looked up on the instance)."""
    take_step = getattr(pipeline_engine, "_take_model_step", None)
    if not callable(take_step):
        raise RuntimeError(f"{type(pipeline_engine).__name__} has no _take_model_step: this DeepSpeed version "
                           f"steps pipelines differently; megalm's step guard needs a place before the optimizer")

    def guarded(*args: Any, **kwargs: Any) -> Any:
        hook()
        return take_step(*args, **kwargs)

    pipeline_engine._take_model_step = guarded


def clip_with_norm(zero_optimizer: Any, grad_norm: Callable[[], float]) -> None:
    """ZeRO-1/2/3: DeepSpeed clips with a global norm megalm already has (a host float, from the
    step guard) instead of taking its own: a norm kernel per parameter and a host read per step."""
    # A CPU tensor: DeepSpeed's validity check and clip factor then never read the device.
    def norm(*_: Any) -> torch.Tensor:
        return torch.tensor(grad_norm(), dtype=torch.float32)

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


def backward_factor(engine: Any) -> float:
    """What each rank's loss is multiplied by before backward so the reduced gradient is the sum
    of the sequence-parallel ranks' shares, averaged over data parallelism. ZeRO-0/1/2 divide the
    reduction over the data × sequence ranks by the data-parallel size only; ZeRO-3's
    reduce-scatter divides by all of them, so its shares are scaled back by N there."""
    sp = int(getattr(engine, "sequence_parallel_size", 1) or 1)
    if sp == 1 or engine.zero_optimization_stage() != 3:
        return 1.0
    if not engine.zero_reduce_scatter():
        # DeepSpeed's other ZeRO-3 reduction (small contiguous buckets) divides by the data-parallel
        # size only, and large buckets still take the reduce-scatter: no single factor holds.
        raise RuntimeError("ZeRO-3 with sequence parallelism needs zero_optimization.reduce_scatter (megalm's default)")
    return float(sp)


def global_grad_norm(engine: Any) -> float | None:
    """The gradient norm DeepSpeed took at its last step, when it took one."""
    g = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return None if g is None else float(g)


def loss_scale(engine: Any) -> float:
    opt = getattr(engine, "optimizer", None)
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)) or 1.0)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], zero3: bool) -> Iterator[None]:
    """Inside: ZeRO-3-partitioned `params` hold their full values (collective). Other stages keep
    whole parameters: nothing to do, and DeepSpeed is not imported."""
    if not zero3:
        yield
        return
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params)):
        yield


def device_of(engine: Any) -> torch.device:
    return torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")
