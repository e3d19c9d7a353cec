"""Muon for the hidden matrices, AdamW for the rest, as ONE optimizer DeepSpeed's ZeRO knows.

DeepSpeed's `MuonWithAuxAdam` orthogonalises inside ZeRO (stage 1/2 while flattening the reduced
gradient, stage 3 per sub-group, stage 0 in `step`), keyed by each parameter's `use_muon`
attribute. DeepSpeed sets that attribute by parameter NAME when its config names Muon ("embed"
and "lm_head" stay on Adam), which would hand megalm's untied head `output` to Muon. So megalm
builds the optimizer itself and tags by structure: a 2-D parameter inside the transformer blocks
(`model.layers`) is a hidden matrix; embeddings, head, norms and biases are not. The optimizer
itself (and its Newton–Schulz routing) is DeepSpeed's: megalm.engine.muon.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from megalm.errors import UserError
from megalm.train.config import OptimizerSection


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the parameters Muon updates: the 2-D weights of the blocks in `model.layers`."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"optimizer.name: muon needs a model whose transformer blocks are `.layers`; "
                        f"{type(model).__name__} has none")
    return {id(p) for p in layers.parameters() if p.requires_grad and p.dim() == 2}


def muon_param_groups(model: nn.Module, o: OptimizerSection,
                      owned: nn.Module | None = None) -> list[dict[str, Any]]:
    """[Muon: hidden matrices] + [AdamW, decayed: other matrices] + [AdamW, no decay: the rest];
    each parameter gets the `use_muon` attribute DeepSpeed's ZeRO optimizers read.

    `owned`: the module this rank optimises (a pipeline stage's PipelineModule holds only its own
    layers); the hidden matrices are still found by structure on the whole `model`."""
    hidden = hidden_matrices(model)
    muon, adam_decay, adam_other = [], [], []
    for p in (owned if owned is not None else model).parameters():
        if not p.requires_grad:
            continue
        p.use_muon = id(p) in hidden
        (muon if p.use_muon else adam_decay if p.dim() >= 2 else adam_other).append(p)
    adam = dict(use_muon=False, lr=o.lr, lr_scale=1.0, betas=tuple(o.betas), eps=o.eps)
    groups = [dict(params=muon, use_muon=True, lr=o.muon_lr, lr_scale=o.muon_lr / o.lr,
                   momentum=o.muon_momentum, weight_decay=o.weight_decay, ns_method="standard"),
              dict(params=adam_decay, weight_decay=o.weight_decay, **adam),
              dict(params=adam_other, weight_decay=0.0, **adam)]
    return [g for g in groups if g["params"]]


def check_resumable(saved_config: dict[str, Any], saved_world: int, dp_world: int) -> None:
    """Refuse, in one line, a Muon checkpoint whose momentum a data-parallel size change would lose.

    Carried: ZeRO-1/2 (megalm.engine.muon_universal re-shards the momentum through DeepSpeed's
    universal conversion) and ZeRO-0 in fp32 (its optimizer state is saved whole). Not carried:
    ZeRO-3, optimizer offload, pipelines and bf16/fp16 ZeRO-0 (other layouts, untested)."""
    o, p = saved_config.get("optimizer", {}), saved_config.get("parallel", {})
    if o.get("name") != "muon":
        return
    stages = max(1, int(p.get("pipeline_stages", 1)))
    saved_dp, zero = saved_world // stages, int(p.get("zero_stage", 1))
    dtype = saved_config.get("precision", {}).get("dtype")
    carried = stages == 1 and not p.get("offload_optimizer") and (zero in (1, 2) or (zero == 0 and dtype == "fp32"))
    if saved_dp != dp_world and not carried:
        what = (f"ZeRO-{zero}" + (", pipeline" if stages > 1 else "") + (", offload" if p.get("offload_optimizer")
                else "") + (f", {dtype}" if zero == 0 else ""))
        raise UserError(f"optimizer.name: muon: this checkpoint was trained on data-parallel size {saved_dp} "
                        f"({what}); resuming on {dp_world} would lose Muon's momentum (carried across a "
                        f"data-parallel size change only for ZeRO-1/2 and fp32 ZeRO-0): resume on {saved_dp} "
                        f"data-parallel ranks")
