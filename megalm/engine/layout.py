"""DeepSpeed's files inside a checkpoint folder, decoded in one place: the model-states file that
holds megalm's client state, and every model tensor, one at a time, from any layout megalm trains
with. Resume checks, `megalm sample`, finetuning's init_from and export all read through here.

    tensors = StateTensors(tag_dir, client_state)
    for name, tensor in tensors.items():   # the model's state-dict names and order, fp32 master weights
        ...

Layouts:
- ZeRO-0: `module` of mp_rank_00_model_states.pt.
- ZeRO-1/2: each DP rank's optimizer file holds, per parameter group, an equal slice of the
  group's flat fp32 vector (`single_partition_of_fp32_groups`); the parameters lie back to back
  in that vector in `param_shapes` order (plus `param_alignment_paddings`), so a parameter may
  straddle two ranks' slices.
- ZeRO-3: every parameter is split on its own: rank r holds elements [r*p, (r+1)*p) of the
  flattened parameter padded to a multiple of the DP size (p = ceil(numel / dp)), and those
  pieces lie back to back in the rank's `fp32_flat_groups` (concatenated across groups).
- Pipeline: one `layer_NN-model_states.pt` per layer of the model's pipeline layer list.
- Tensor parallelism: each of the above per TP rank (`mp_rank_NN` in the names), each holding its
  slice of the split weights; the client state's `tensor_parallel` plan says which and along what.
Parameters frozen during training (LoRA's base weights) come from `frozen_param_fragments`; a
parameter stored once under two names (a tied head) is `shared_params`' second name.

Files are memory-mapped and only the pages of the tensor being read are touched; the mappings
are dropped every `release_bytes` read (a tensor still held keeps only its own pages), so resident
memory stays near one tensor plus what the consumer buffers, whatever the model size. Nothing here
runs code from the files: every load goes through the unpickle allowlist below.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from megalm.checkpoint.layout import CLIENT_KEYS
from megalm.checkpoint.reader import CheckpointReader
from megalm.checkpoint.reader import resolve as resolve_with
from megalm.checkpoint.unpickle import check_dir, safe_load
from megalm.engine.tensor import merge_items, split_dim
from megalm.errors import UserError

Item = tuple[str, torch.Tensor]
MODEL_STATES = "mp_rank_00_model_states.pt"  # holds the client state (non-pipeline; ZeRO-3: rank 0's copy)
_RANK_RE = r"zero_pp_rank_(\d+)_mp_rank_{mp:02d}_(model|optim)_states\.pt$"
PipelineMap = list[tuple[str, str, str]]  # (layer file, name inside it, plain model name)


def allowlist() -> list[Any]:
    """The non-tensor objects DeepSpeed pickles into its files: the ZeRO optimizer's loss scaler
    and stage enum, and tensor-fragment addresses."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it (export, sample)
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """One of DeepSpeed's files, building nothing outside the allowlist (UserError naming it)."""
    return safe_load(path, map_location=map_location, mmap=mmap, allow=allowlist())


def check(root: str) -> None:
    """Every *.pt under `root` against the allowlist, before DeepSpeed's own loaders (which
    unpickle with weights_only=False) read them."""
    check_dir(root, allow=allowlist())


def reader(root: str, verify_threads: int = 4) -> CheckpointReader:
    """A reader of the checkpoint root `root` that admits DeepSpeed's records."""
    return CheckpointReader(root, verify_threads, allow=allowlist)


def resolve(path: str) -> tuple[CheckpointReader, str]:
    """megalm.checkpoint.reader.resolve, admitting DeepSpeed's records."""
    return resolve_with(path, allow=allowlist)


def model_states(tag_dir: str, mmap: bool = False) -> dict[str, Any]:
    """The model-states file that holds megalm's client state (DeepSpeed's keys included).

    `mmap`: tensors (a ZeRO-0 file's whole model) stay on disk until touched."""
    files = [os.path.join(tag_dir, MODEL_STATES)] + sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    for f in dict.fromkeys(files):
        if os.path.exists(f) and not os.path.basename(f).startswith("layer_"):
            state = load(f, mmap=mmap)
            if isinstance(state, dict) and CLIENT_KEYS in state:
                return state
    raise UserError(f"{tag_dir}: not a megalm training checkpoint (no model states with megalm's client state)")


def client_state(tag_dir: str) -> dict[str, Any]:
    """Exactly the client_state dict the trainer saved (the weights beside it are not read)."""
    state = model_states(tag_dir, mmap=True)
    return {k: state[k] for k in state[CLIENT_KEYS]}


def read_client_state(checkpoint: str) -> tuple[str, dict[str, Any]]:
    """(checkpoint folder, the client state the trainer saved there) for any path resolve()
    takes; verified, weights not read (a task whose sampler needs only its own saved state)."""
    found, tag = resolve(checkpoint)
    tag_dir = os.path.join(found.dir, tag)
    return tag_dir, client_state(tag_dir)


def pipeline_map(model: nn.Module, layers: list[nn.Module]) -> PipelineMap:
    """Where each parameter of `model` lies in a pipeline checkpoint of its layer list `layers`
    (first use only: a tied weight is read from its first layer)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out, seen = [], set()
    for idx, layer in enumerate(layers):
        for local, p in layer.named_parameters(remove_duplicate=False):
            if names[id(p)] not in seen:
                seen.add(names[id(p)])
                out.append((f"layer_{idx:02d}-model_states.pt", local, names[id(p)]))
    return out


class StateTensors:
    """The model tensors of one verified checkpoint folder `tag_dir`, whose client state is `meta`.

    `pipeline`: for a pipeline checkpoint, a callable giving its PipelineMap (the model's layer list)."""

    def __init__(self, tag_dir: str, meta: dict[str, Any], release_bytes: int = 128 << 20,
                 pipeline: Callable[[], PipelineMap] | None = None, mp_rank: int | None = None):
        self.tag_dir = tag_dir
        self.meta = meta
        self.release_bytes = release_bytes
        self._pipeline = pipeline
        self._files: dict[str, Any] = {}
        self._touched = 0
        # Tensor parallelism: one reader per TP rank's files (`mp_rank`), their slices put together
        # by the plan the trainer saved (megalm.engine.tensor.split_dim).
        self.tp_plan = meta.get("tensor_parallel") if mp_rank is None else None
        self.mp_rank = mp_rank or 0
        self._parts = [StateTensors(tag_dir, meta, max(1, release_bytes // self.tp_plan["size"]), pipeline, m)
                       for m in range(self.tp_plan["size"])] if self.tp_plan else []
        parallel = meta.get("config", {}).get("parallel", {})
        if parallel.get("pipeline_stages", 1) > 1:
            self.layout = "pipeline"
            if pipeline is None:
                raise UserError(f"{tag_dir}: a pipeline checkpoint: reading it needs the model's layer list")
        elif parallel.get("zero_stage", 0) >= 1:
            self.layout = "zero3" if int(self._optim(0)["zero_stage"]) == 3 else "zero12"
        else:
            self.layout = "zero0"
        self.precision = meta.get("config", {}).get("precision", {}).get("dtype", "fp32")

    # -- files ---------------------------------------------------------------------------------

    def _load(self, name: str) -> Any:
        if name not in self._files:
            path = os.path.join(self.tag_dir, name)
            if not os.path.exists(path):
                raise UserError(f"{self.tag_dir}: checkpoint lacks {name}")
            self._files[name] = load(path, mmap=True)
        return self._files[name]

    def release(self) -> None:
        """Drop every mapping: the pages read so far stop counting as resident memory."""
        self._files.clear()
        self._touched = 0

    def _model_states_name(self) -> str:
        if self.layout == "zero3":
            return f"zero_pp_rank_0_mp_rank_{self.mp_rank:02d}_model_states.pt"
        return f"mp_rank_{self.mp_rank:02d}_model_states.pt"

    def _states(self) -> dict[str, Any]:
        return self._load(self._model_states_name())

    def _rank_files(self, kind: str) -> list[str]:
        found = {}
        for path in glob.glob(os.path.join(self.tag_dir, f"*_{kind}_states.pt")):
            match = re.search(_RANK_RE.format(mp=self.mp_rank), os.path.basename(path))
            if match:
                found[int(match.group(1))] = os.path.basename(path)
        if sorted(found) != list(range(len(found))) or not found:
            raise UserError(f"{self.tag_dir}: ZeRO {kind}-state files of ranks {sorted(found)}: expected ranks 0..N-1")
        return [found[r] for r in range(len(found))]

    def _optim(self, rank: int) -> dict[str, Any]:
        name = self._rank_files("optim")[rank]
        state = self._load(name)
        if not isinstance(state, dict) or "optimizer_state_dict" not in state:
            raise UserError(f"{os.path.join(self.tag_dir, name)}: no optimizer_state_dict (not a ZeRO checkpoint file)")
        return state["optimizer_state_dict"]

    # -- the tensors ---------------------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        """(name, tensor) in the model's state-dict order, contiguous, in the stored (master)
        dtype. A tensor may be a view of the memory-mapped file: copy it before changing it."""
        if self._parts:
            yield from merge_items([part.items() for part in self._parts], self.tp_plan)
            return
        reads = {"zero0": self._zero0_items, "zero12": self._zero12_items, "zero3": self._zero3_items,
                 "pipeline": self._pipeline_items}[self.layout]
        try:
            for name, tensor in reads():
                self._touched += tensor.numel() * tensor.element_size()
                if self._touched >= self.release_bytes:
                    self.release()  # before the consumer holds the tensor: its pages go with it
                yield name, tensor
        finally:
            self.release()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in fp32, in memory (a model that fits on the host: resume checks, sampling)."""
        return {name: tensor.float().clone() for name, tensor in self.items()}

    def names(self) -> list[str]:
        """State-dict names in order, without reading any tensor data."""
        if self.layout == "pipeline":
            return [plain for _, _, plain in self._pipeline()]
        if self._parts:
            return self._parts[0].names()
        states = self._states()
        return list(states["module"].keys()) if states.get("module") else \
            [n for group in states["param_shapes"] for n in group]

    def numel(self, skip: Callable[[str], bool] = lambda name: False) -> int:
        """Elements of the tensors items() yields, less those `skip` names (e.g. LoRA adapters a
        merge folds away), from the files' shape records (no data read)."""
        if self.layout == "pipeline":
            return sum(self._load(f)[local].numel() for f, local, name in self._pipeline() if not skip(name))
        if self._parts:  # split tensors: every rank's slice; whole ones: rank 0's copy
            def split(name: str) -> bool:
                return split_dim(name, self.tp_plan) is not None

            return (sum(p.numel(lambda n: skip(n) or not split(n)) for p in self._parts)
                    + self._parts[0].numel(lambda n: skip(n) or split(n)))
        states = self._states()
        if self.layout == "zero3":
            shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}
            shapes.update(states.get("frozen_param_shapes") or {})
            return sum(math.prod(s) for n, s in shapes.items() if not skip(n))
        return sum(t.numel() for n, t in states["module"].items() if not skip(n))

    def _shared(self) -> dict[str, str]:
        """{second name: the name the tensor is stored under} for parameters stored once."""
        return dict(self._states().get("shared_params") or {})

    def _zero0_items(self) -> Iterator[Item]:
        for name in list(self._states()["module"]):
            yield name, self._states()["module"][name]

    def _zero12_items(self) -> Iterator[Item]:
        states = self._states()
        frozen = dict(states.get("frozen_param_shapes") or {})
        where: dict[str, tuple[int, int, torch.Size]] = {}
        paddings = self._optim(0).get("param_alignment_paddings")
        for g, shapes in enumerate(states["param_shapes"]):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                where[name] = (g, offset, torch.Size(shape))
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
        ranks = len(self._rank_files("optim"))
        shared = self._shared()

        def read(name: str) -> torch.Tensor:
            if name in frozen:
                return self._states()["frozen_param_fragments"][name]
            if name not in where:
                return self._states()["module"][name]  # a buffer
            g, start, shape = where[name]
            parts, pos, end = [], start, start + math.prod(shape)
            while pos < end:
                flat = [self._optim(r)["single_partition_of_fp32_groups"][g] for r in range(ranks)]
                size = flat[0].numel()
                rank, local = divmod(pos, size)
                if rank >= ranks:
                    raise UserError(f"{self.tag_dir}: {name} lies past the end of the ZeRO partitions of group {g}")
                take = min(end - pos, size - local)
                parts.append(flat[rank][local:local + take])
                pos += take
            return torch.cat(parts).view(shape)

        for name in self.names():
            yield name, read(shared.get(name, name) if name not in where else name)

    def _zero3_items(self) -> Iterator[Item]:
        model_files = self._rank_files("model")
        states = self._load(model_files[0])
        ranks = len(model_files)
        frozen = dict(states.get("frozen_param_shapes") or {})
        where: dict[str, tuple[int, torch.Size]] = {}
        offset = 0
        for shapes in states["param_shapes"]:
            for name, shape in shapes.items():
                where[name] = (offset, torch.Size(shape))
                offset += math.ceil(math.prod(shape) / ranks)
        shared = self._shared()

        def read(name: str) -> torch.Tensor:
            if name in frozen:
                shape = torch.Size(frozen[name])
                frags = [self._load(f)["frozen_param_fragments"][name].reshape(-1) for f in model_files]
                return torch.cat(frags)[:shape.numel()].view(shape)
            if name not in where:
                module = self._load(model_files[0]).get("module") or {}
                if name in module:
                    return module[name]  # a buffer
                raise UserError(f"{self.tag_dir}: {name} is in neither param_shapes nor frozen_param_shapes")
            start, shape = where[name]
            part = math.ceil(shape.numel() / ranks)
            pieces = [_flat_slice(self._optim(r)["fp32_flat_groups"], start, part) for r in range(ranks)]
            return torch.cat(pieces)[:shape.numel()].view(shape)

        for name in self.names():
            yield name, read(shared.get(name, name) if name not in where else name)

    def _pipeline_items(self) -> Iterator[Item]:
        for file, local, plain in self._pipeline():
            saved = self._load(file)
            if local not in saved:
                raise UserError(f"{os.path.join(self.tag_dir, file)}: missing parameter {local}")
            yield plain, saved[local]


def _flat_slice(groups: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of `groups`, touching only those."""
    parts = []
    for flat in groups:
        n = flat.numel()
        if start < n and length > 0:
            take = min(length, n - start)
            parts.append(flat[start:start + take])
            length -= take
            start = 0
        else:
            start -= n
    if length > 0:
        raise UserError("ZeRO-3 partition shorter than its parameter shapes say (checkpoint written by another "
                        "model?)")
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def has_partitioned_optimizer(manifest: dict[str, Any]) -> bool:
    return any(f["path"].endswith("optim_states.pt") for f in manifest["files"])


def conversion_needed(manifest: dict[str, Any], dp_world_size: int, tensor_parallel: int = 1) -> bool:
    """A checkpoint whose optimizer state is split per DP rank, loaded on another DP size or
    tensor-parallel size (DeepSpeed's universal form merges AutoTP's slices too). A ZeRO-0
    checkpoint saved with tensor parallelism cannot change its TP size (nothing converts it)."""
    saved_tp = int(manifest.get("tensor_parallel", 1))
    if saved_tp != tensor_parallel and not has_partitioned_optimizer(manifest):
        raise UserError(f"parallel.tensor_parallel: a ZeRO-0 checkpoint saved with tensor_parallel={saved_tp} resumes "
                        f"only at tensor_parallel={saved_tp}, got {tensor_parallel} (ZeRO 1-3 checkpoints change "
                        f"the TP size through universal conversion)")
    return has_partitioned_optimizer(manifest) and (int(manifest["dp_world_size"]) != dp_world_size
                                                    or saved_tp != tensor_parallel)


def weights(tag_dir: str, meta: dict[str, Any], model: nn.Module,
            layers: Callable[[nn.Module], list[nn.Module]] | None = None) -> dict[str, torch.Tensor]:
    """The plain `model`'s fp32 state from checkpoint folder `tag_dir` (client state `meta`), in
    memory. `layers(model)`: its pipeline layer list, needed for a pipeline checkpoint."""
    mapping = (lambda: pipeline_map(model, layers(model))) if layers is not None else None
    return StateTensors(tag_dir, meta, pipeline=mapping).state_dict()
