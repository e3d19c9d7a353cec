"""Stream a checkpoint's model tensors, one at a time, from any layout megalm trains with.

    src = CheckpointTensors("runs/demo/checkpoints")
    for name, tensor in src.items():    # the model's state-dict names and order, fp32 master weights
        ...

Layouts (the same choice as megalm.checkpoint.reader.CheckpointReader.weights):
- ZeRO-0: `module` of mp_rank_00_model_states.pt.
- ZeRO-1/2: each DP rank's optimizer file holds, per parameter group, an equal slice of the
  group's flat fp32 vector (`single_partition_of_fp32_groups`); the parameters lie back to back
  in that vector in `param_shapes` order (plus `param_alignment_paddings`), so a parameter may
  straddle two ranks' slices.
- ZeRO-3: every parameter is split on its own: rank r holds elements [r*p, (r+1)*p) of the
  flattened parameter padded to a multiple of the DP size (p = ceil(numel / dp)), and those
  pieces lie back to back in the rank's `fp32_flat_groups` (concatenated across groups).
- Pipeline: one `layer_NN-model_states.pt` per layer of megalm.models.pipeline.pipeline_layers.
Parameters frozen during training (LoRA's base weights) come from `frozen_param_fragments`.

Files are memory-mapped and only the pages of the tensor being read are touched; the mappings
are dropped every `release_bytes` read (a tensor still held keeps only its own pages), so resident
memory stays near one tensor plus what the consumer buffers, whatever the model size. Nothing here runs code from the files: every load goes
through megalm.checkpoint.unpickle's allowlist, and the checkpoint's checksums are verified first.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megalm.checkpoint.reader import resolve
from megalm.checkpoint.unpickle import safe_load
from megalm.errors import UserError
from megalm.models.config import LLMConfig

Item = tuple[str, torch.Tensor]
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


class CheckpointTensors:
    """The model tensors of one verified checkpoint (a step folder, checkpoint root or run dir)."""

    def __init__(self, checkpoint: str, release_bytes: int = 128 << 20,
                 build_model: Callable[[LLMConfig], torch.nn.Module] | None = None):
        reader, tag = resolve(checkpoint)  # verifies every file's sha256 and the unpickle allowlist
        self.tag_dir = os.path.join(reader.dir, tag)
        self.meta = reader.client_state(tag)
        if self.meta.get("data", {}).get("task") == "diffusion":
            raise UserError(f"{self.tag_dir}: a DiT (diffusion) checkpoint: export it with --format diffusers")
        if "model_config" not in self.meta.get("data", {}):
            raise UserError(f"{self.tag_dir}: not a language-model checkpoint (no data.model_config in its client state)")
        self.config = LLMConfig.from_dict(dict(self.meta["data"]["model_config"]),
                                          source=f"{self.tag_dir}: model_config")
        self._build_model = build_model
        self.release_bytes = release_bytes
        self._files: dict[str, Any] = {}
        self._touched = 0
        parallel = self.meta.get("config", {}).get("parallel", {})
        if parallel.get("pipeline_stages", 1) > 1:
            self.layout = "pipeline"
        elif parallel.get("zero_stage", 0) >= 1:
            self.layout = "zero3" if int(self._optim(0)["zero_stage"]) == 3 else "zero12"
        else:
            self.layout = "zero0"
        self.precision = self.meta.get("config", {}).get("precision", {}).get("dtype", "fp32")

    # -- files ---------------------------------------------------------------------------------

    def _load(self, name: str) -> Any:
        if name not in self._files:
            path = os.path.join(self.tag_dir, name)
            if not os.path.exists(path):
                raise UserError(f"{self.tag_dir}: checkpoint lacks {name}")
            self._files[name] = safe_load(path, mmap=True)
        return self._files[name]

    def release(self) -> None:
        """Drop every mapping: the pages read so far stop counting as resident memory."""
        self._files.clear()
        self._touched = 0

    def _model_states_name(self) -> str:
        if self.layout == "zero3":
            return "zero_pp_rank_0_mp_rank_00_model_states.pt"
        return "mp_rank_00_model_states.pt"

    def _rank_files(self, kind: str) -> list[str]:
        found = {}
        for path in glob.glob(os.path.join(self.tag_dir, f"*_{kind}_states.pt")):
            match = _RANK_RE.search(os.path.basename(path))
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

    def names(self) -> list[str]:
        """State-dict names in order, without reading any tensor data."""
        states = self._load(self._model_states_name())
        if self.layout == "pipeline":
            return [plain for _, _, plain in self._pipeline_map()]
        return list(states["module"].keys()) if states.get("module") else \
            [n for group in states["param_shapes"] for n in group]

    def numel(self, skip: Callable[[str], bool] = lambda name: False) -> int:
        """Elements of the tensors items() yields, less those `skip` names (e.g. LoRA adapters a
        merge folds away), from the files' shape records (no data read)."""
        states = self._load(self._model_states_name())
        if self.layout == "pipeline":
            return sum(self._load(f)[local].numel() for f, local, name in self._pipeline_map() if not skip(name))
        if self.layout == "zero3":
            shapes = {n: s for group in states["param_shapes"] for n, s in group.items()}
            shapes.update(states.get("frozen_param_shapes") or {})
            return sum(math.prod(s) for n, s in shapes.items() if not skip(n))
        return sum(t.numel() for n, t in states["module"].items() if not skip(n))

    def _zero0_items(self) -> Iterator[Item]:
        for name in list(self._load(self._model_states_name())["module"]):
            yield name, self._load(self._model_states_name())["module"][name]

    def _zero12_items(self) -> Iterator[Item]:
        states = self._load(self._model_states_name())
        frozen = dict(states.get("frozen_param_shapes") or {})
        where: dict[str, tuple[int, int, torch.Size]] = {}
        paddings = self._optim(0).get("param_alignment_paddings")
        for g, shapes in enumerate(states["param_shapes"]):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                where[name] = (g, offset, torch.Size(shape))
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
        ranks = len(self._rank_files("optim"))
        for name in self.names():
            if name in frozen:
                yield name, self._load(self._model_states_name())["frozen_param_fragments"][name]
                continue
            if name not in where:
                yield name, self._load(self._model_states_name())["module"][name]  # a buffer
                continue
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
            yield name, torch.cat(parts).view(shape)

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
        for name in self.names():
            if name in frozen:
                shape = torch.Size(frozen[name])
                frags = [self._load(f)["frozen_param_fragments"][name].reshape(-1) for f in model_files]
                yield name, torch.cat(frags)[:shape.numel()].view(shape)
                continue
            if name not in where:
                raise UserError(f"{self.tag_dir}: {name} is in neither param_shapes nor frozen_param_shapes")
            start, shape = where[name]
            part = math.ceil(shape.numel() / ranks)
            pieces = [_flat_slice(self._optim(r)["fp32_flat_groups"], start, part) for r in range(ranks)]
            yield name, torch.cat(pieces)[:shape.numel()].view(shape)

    def _pipeline_map(self) -> list[tuple[str, str, str]]:
        """(layer file, name inside it, plain model name) for every parameter, first use only."""
        from megalm.models.llm import LLM
        from megalm.models.pipeline import pipeline_layers

        with torch.device("meta"):
            model = (self._build_model or LLM)(self.config)
        names = {id(p): n for n, p in model.named_parameters()}
        out, seen = [], set()
        for idx, layer in enumerate(pipeline_layers(model)):
            for local, p in layer.named_parameters(remove_duplicate=False):
                if names[id(p)] not in seen:
                    seen.add(names[id(p)])
                    out.append((f"layer_{idx:02d}-model_states.pt", local, names[id(p)]))
        return out

    def _pipeline_items(self) -> Iterator[Item]:
        for file, local, plain in self._pipeline_map():
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
