"""The DeepSpeed JSON config, generated from a validated `TrainConfig`: every key megalm owns is
written here once; the user's raw `deepspeed:` section may add keys, never replace these."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # megalm.train.config imports this module to validate with it: the type only
    from megalm.train.config import TrainConfig


def to_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from `cfg` (user's `deepspeed:` dict merged last)."""
    cfg.validate_world(world_size)
    p, prec = cfg.parallel, cfg.precision
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if cfg.optimizer.name == "muon" and p.zero_stage == 3:
        # ZeRO-3 orthogonalises whole gathered gradients; DeepSpeed refuses Muon with reduce-scatter.
        zero["reduce_scatter"] = False
    force_ds_cpu_adam = None
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        # Our optimizer (FusedAdamW) steps the offloaded fp32 partitions itself.
        force_ds_cpu_adam = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "train_batch_size": cfg.batch.global_batch,
        # megalm clips ZeRO-0 itself, with the norm its step guard already has (megalm_zero0).
        "gradient_clipping": 0.0 if cfg.megalm_zero0() else cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # FusedAdamW is a plain torch Optimizer
    }
    if force_ds_cpu_adam is not None:
        ds["zero_force_ds_cpu_optimizer"] = force_ds_cpu_adam
    if prec.dtype == "bf16" and cfg.megalm_zero0():
        # The model arrives in bf16 and megalm's AdamW keeps the fp32 masters (megalm.train.build):
        # DeepSpeed runs as for fp32 and all-reduces the bf16 gradients as its bf16 mode would.
        ds["communication_data_type"] = "bf16"
    elif prec.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
        if cfg.megalm_grad_norm():  # the guard skips a step with a non-finite gradient norm
            ds["bf16"]["check_grad_overflow"] = False
    elif prec.dtype == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": prec.loss_scale,
            "initial_scale_power": prec.initial_scale_power,
        }
    for key, owner in _PARALLELISM.items():  # set by megalm when it builds the engine, never raw
        if key in cfg.deepspeed:
            raise cfg._err(f"deepspeed.{key}", f"megalm sets this itself (from {owner}); set {owner} instead")
    for key in ("bf16", "fp16", "torch_autocast"):  # a mode megalm did not choose would change what runs
        if key in cfg.deepspeed and key not in ds:
            raise cfg._err(f"deepspeed.{key}", f"megalm sets the precision itself (precision.dtype is "
                                               f"{prec.dtype} here); set precision.dtype instead")
    _refuse_overrides(cfg, ds, cfg.deepspeed)
    return _merge(ds, cfg.deepspeed)


# DeepSpeed's model-parallel keys: megalm builds the groups (and AutoTP's plan) itself.
_PARALLELISM = {"tensor_parallel": "parallel.tensor_parallel", "sequence_parallel_size": "parallel.sequence_parallel",
                "data_parallel_size": "parallel.tensor_parallel or parallel.sequence_parallel"}
# DeepSpeed keys megalm writes -> the megalm key that sets them (others: megalm's own choice).
_OWNERS = {"train_micro_batch_size_per_gpu": "batch.micro_batch", "gradient_accumulation_steps": "batch.global_batch",
           "train_batch_size": "batch.global_batch", "gradient_clipping": "optimizer.grad_clip",
           "zero_optimization.stage": "parallel.zero_stage", "zero_optimization.offload_optimizer":
           "parallel.offload_optimizer", "bf16.enabled": "precision.dtype", "fp16.enabled": "precision.dtype",
           "fp16.loss_scale": "precision.loss_scale",
           "communication_data_type": "precision.dtype", "fp16.initial_scale_power": "precision.initial_scale_power"}


def _refuse_overrides(cfg: TrainConfig, ds: dict[str, Any], raw: dict[str, Any], prefix: str = "") -> None:
    """A raw `deepspeed:` value may add keys, never replace one megalm sets: the config would no
    longer say what runs (a train_batch_size override used to slip past the batch checks)."""
    for k, v in raw.items():
        path = f"{prefix}{k}"
        if k not in ds:
            continue
        if isinstance(v, dict) and isinstance(ds[k], dict) and path not in _OWNERS:
            _refuse_overrides(cfg, ds[k], v, path + ".")
            continue
        owner = _OWNERS.get(path) or next((o for p, o in _OWNERS.items() if path.startswith(p + ".")), None)
        raise cfg._err(f"deepspeed.{path}", f"megalm sets this itself ({f'from {owner}' if owner else 'not a user setting'}); "
                                            f"{f'set {owner} instead' if owner else 'remove it from deepspeed:'}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
