"""Muon's momentum through a data-parallel size change (the universal conversion of universal.py).

DeepSpeed's `ds_to_universal` knows Adam's state only: it reads `exp_avg`/`exp_avg_sq` of every
parameter group and fails (KeyError) on a Muon group, whose one state is `momentum_buffer`. And
ZeRO-1/2 without offload keep that buffer in a DP-size-dependent layout: WHOLE matrices, every
matrix that touches the rank's partition, concatenated in partition order (DeepSpeed runs Muon on
the full reduced gradient there); a matrix split across two ranks is on both.

So megalm converts a copy whose Muon groups carry the momentum as `exp_avg`, sliced to the
partition layout Adam state has (and a zero `exp_avg_sq`): DeepSpeed then reshards it like any
Adam moment. After the universal load, `restore_momentum` moves it back into `momentum_buffer` in
the layout the new engine uses (whole matrices gathered across the new DP group for ZeRO-1/2,
the partition itself with optimizer offload) and drops the stand-ins.
ZeRO-3 is not handled here (megalm.train.muon.check_resumable refuses that resume in one line).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import torch
import torch.distributed as dist

from megalm.engine.layout import MODEL_STATES as MODEL_FILE
from megalm.errors import UserError

OPTIM_GLOB = "*optim_states.pt"
MOMENTUM, STAND_IN, STAND_IN_SQ = "momentum_buffer", "exp_avg", "exp_avg_sq"


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _load(path: str, mmap: bool = False) -> dict:
    # DeepSpeed's own pickles (loss scaler objects); the caller ran the unpickle allowlist first.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def _dp_rank(path: str) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_mp_rank_", os.path.basename(path))
    if found is None:
        raise UserError(f"{path}: not a ZeRO optimizer file name (zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt)")
    return int(found.group(1))


def has_muon_state(source: str) -> bool:
    files = sorted(glob.glob(os.path.join(source, OPTIM_GLOB)))
    if not files:
        return False
    state = _load(files[0], mmap=True)["optimizer_state_dict"]  # keys only: no tensor is read
    base = state.get("base_optimizer_state", state.get("optimizer_state_dict", {}))
    return any(MOMENTUM in s for s in base.get("state", {}).values())


def _partition_momentum(osd: dict, group: int, buf: torch.Tensor, shapes: dict[str, Any], dp_rank: int) -> torch.Tensor:
    """This rank's Muon momentum in the partition layout of its fp32 group (Adam's layout)."""
    fp32 = osd["single_partition_of_fp32_groups"][group]
    if buf.numel() == fp32.numel():
        return buf.to(fp32.dtype).clone()  # already the partition (optimizer offload, or one rank)
    mappings = osd["param_slice_mappings"][group]
    whole = sum(_numel(shapes[name]) for name in mappings)
    if buf.numel() != whole:
        raise UserError(f"Muon momentum of group {group}: {buf.numel()} values, expected the partition "
                        f"({fp32.numel()}) or its whole matrices ({whole}): unknown DeepSpeed layout")
    starts, offset = {}, 0  # where each matrix starts in the group's flat (unpartitioned) order
    for name, shape in shapes.items():
        starts[name], offset = offset, offset + _numel(shape)
    part, at = torch.zeros_like(fp32), 0
    for name, frag in mappings.items():
        numel = _numel(shapes[name])
        inside = dp_rank * fp32.numel() + frag.start - starts[name]  # fragment's offset in its matrix
        part.narrow(0, frag.start, frag.numel).copy_(buf.narrow(0, at + inside, frag.numel))
        at += numel
    return part


def prepare_source(source: str, work: str) -> str:
    """The folder to convert: `source` itself, or (Muon state present) a copy in `work` whose Muon
    groups hold the momentum as `exp_avg` in partition layout. Other files are linked, not copied."""
    if not has_muon_state(source):
        return source
    model = _load(os.path.join(source, MODEL_FILE))
    shapes = model["param_shapes"]
    out = os.path.join(work, "muon-source", os.path.basename(source))
    os.makedirs(out)
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if not name.endswith("optim_states.pt"):
            os.symlink(path, os.path.join(out, name))
            continue
        sd = _load(path)
        osd = sd["optimizer_state_dict"]
        if "base_optimizer_state" not in osd:
            raise UserError(f"{path}: Muon momentum across a data-parallel size change is supported for "
                            f"ZeRO-1/2 checkpoints, not ZeRO-3")
        for group, state in osd["base_optimizer_state"]["state"].items():
            if MOMENTUM in state:
                part = _partition_momentum(osd, group, state.pop(MOMENTUM), shapes[group], _dp_rank(path))
                state[STAND_IN], state[STAND_IN_SQ] = part, torch.zeros_like(part)
        torch.save(sd, os.path.join(out, name))
    return out


def restore_momentum(engine: Any) -> None:
    """Collective, after a universal load: the stand-in `exp_avg` of each Muon group becomes its
    `momentum_buffer` in the layout the loading engine runs Muon with."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", None)
    if base is None or not any(g.get("use_muon") for g in base.param_groups):
        return
    if not hasattr(opt, "params_in_partition"):
        raise UserError("Muon momentum across a data-parallel size change is supported under ZeRO-1/2 only")
    for group, pg in enumerate(base.param_groups):
        if not pg.get("use_muon"):
            continue
        flat = pg["params"][0]
        state = base.state[flat]
        part = state.pop(STAND_IN)
        state.pop(STAND_IN_SQ, None)
        state.pop("step", None)
        if getattr(opt, "cpu_offload", False):
            state[MOMENTUM] = part  # offload runs Muon on its partition layout
            continue
        mine = {id(p) for p in opt.params_in_partition[group]}
        whole = {}
        for p in opt.bit16_groups[group]:  # every rank, same order: each gather is an all-reduce
            m = p.get_full_hp_param(STAND_IN)
            if id(p) in mine:
                whole[id(p)] = m
        state[MOMENTUM] = torch.cat([whole[id(p)].reshape(-1) for p in opt.params_in_partition[group]])
        for p in opt.bit16_groups[group]:
            if p._hp_mapping is not None:
                p._hp_mapping.optim_fragment.pop(STAND_IN, None)
                p._hp_mapping.optim_fragment.pop(STAND_IN_SQ, None)


def momenta(engine: Any) -> dict[str, torch.Tensor]:
    """Collective: every Muon matrix's momentum, whole, by parameter name (ZeRO-0 in fp32, or
    ZeRO-1/2 without offload: what `restore_momentum` rebuilt, read back for tests and checks)."""
    opt = engine.optimizer
    if not hasattr(opt, "params_in_partition"):  # no ZeRO optimizer: per-matrix state, on every rank
        return {name: opt.state[p][MOMENTUM].clone() for name, p in engine.module.named_parameters()
                if getattr(p, "use_muon", False) and MOMENTUM in opt.state[p]}
    base, out = opt.optimizer, {}
    for group, pg in enumerate(base.param_groups):
        if not pg.get("use_muon"):
            continue
        buf, at = base.state[pg["params"][0]][MOMENTUM], 0
        for p in opt.params_in_partition[group]:
            out[opt.param_names[p]] = buf.narrow(0, at, p.numel()).view(p.shape).clone()
            at += p.numel()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
