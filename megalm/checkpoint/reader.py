"""The one checkpoint reader: pick and verify a checkpoint, read its client state, consolidate
its weights from any layout (ZeRO 0-3, pipeline) into the plain model. Used by resume (through
CheckpointManager), `megalm sample`, and export.

No collectives, no DeepSpeed engine, nothing written. Every file is checked against the unpickle
allowlist (unpickle.py) before anything reads it, so reading a checkpoint never runs code.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from typing import Any

import torch

from megalm.checkpoint.files import MARKER, read_manifest, verify_directory
from megalm.checkpoint.layout import CLIENT_KEYS, MODEL_STATES, TAG_RE, published_tags, tag_for
from megalm.checkpoint.unpickle import check_dir, safe_load
from megalm.errors import UserError

RUN_CHECKPOINTS = "checkpoints"  # a run directory's checkpoint root (runs/<name>/checkpoints)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class CheckpointReader:
    """Read-only view of one checkpoint root."""

    def __init__(self, root: str, verify_threads: int = 4):
        self.dir = os.path.abspath(root)
        self.verify_threads = verify_threads
        self._verified: dict[str, tuple[int, dict[str, Any]]] = {}  # tag -> (marker mtime, manifest)

    def list_valid(self) -> list[str]:
        """Published checkpoints whose marker, manifest and file sizes check out, newest last.

        Checksums are verified by select(), not here: hashing is the costly part."""
        out = []
        for tag in published_tags(self.dir):
            try:
                verify_directory(os.path.join(self.dir, tag), full=False)
            except (ValueError, OSError):
                continue
            out.append(tag)
        return out

    def size_of(self, tag: str) -> int:
        try:
            return sum(int(f["bytes"]) for f in read_manifest(os.path.join(self.dir, tag))["files"])
        except (ValueError, OSError):
            return 0

    def forget(self, tag: str) -> None:
        """Drop the cached verification of `tag` (it was just replaced)."""
        self._verified.pop(tag, None)

    def _verify(self, tag: str) -> dict[str, Any]:
        path = os.path.join(self.dir, tag)
        try:
            stamp = os.stat(os.path.join(path, MARKER)).st_mtime_ns
        except OSError:
            stamp = -1
        cached = self._verified.get(tag)
        if cached and cached[0] == stamp:
            return cached[1]
        manifest = verify_directory(path, full=True, threads=self.verify_threads)
        check_dir(path)  # a refused file is a UserError, never skipped silently
        self._verified[tag] = (stamp, manifest)
        return manifest

    def select(self, tag: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """The newest fully verified checkpoint (or `tag`) and its manifest; each one skipped
        gets one warning line naming it. None when there is none."""
        if tag is not None and not TAG_RE.match(tag):
            raise UserError(f"checkpoint tag {tag!r}: expected a name like {tag_for(100)}")
        candidates = [tag] if tag else list(reversed(published_tags(self.dir)))
        for name in candidates:
            try:
                return name, self._verify(name)
            except (ValueError, OSError) as exc:
                reason = exc if isinstance(exc, ValueError) else exc.strerror
                if tag:
                    raise UserError(f"checkpoint {os.path.join(self.dir, name)}: not loadable ({reason})") from None
                _warn(f"skipping checkpoint {os.path.join(self.dir, name)}: {reason}")
        return None

    def model_states(self, tag: str, mmap: bool = False) -> dict[str, Any]:
        """The model-states file that holds megalm's client state (DeepSpeed's keys included).

        `mmap`: tensors (a ZeRO-0 file's whole model) stay on disk until touched."""
        tag_dir = os.path.join(self.dir, tag)
        files = [os.path.join(tag_dir, MODEL_STATES)] + sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
        for f in dict.fromkeys(files):
            if os.path.exists(f) and not os.path.basename(f).startswith("layer_"):
                state = safe_load(f, mmap=mmap)
                if isinstance(state, dict) and CLIENT_KEYS in state:
                    return state
        raise UserError(f"{tag_dir}: not a megalm training checkpoint (no model states with megalm's client state)")

    def client_state(self, tag: str) -> dict[str, Any]:
        """Exactly the client_state dict the trainer saved."""
        state = self.model_states(tag, mmap=True)  # the weights beside it are not read
        return {k: state[k] for k in state[CLIENT_KEYS]}

    def weights(self, tag: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full fp32 state of `model` (the plain, unpartitioned model) from checkpoint `tag`."""
        states = self.model_states(tag)
        parallel = states["config"]["parallel"] if "config" in states else {}
        tag_dir = os.path.join(self.dir, tag)
        if parallel.get("pipeline_stages", 1) > 1:
            state = _pipeline_state(model, tag_dir)
        elif parallel.get("zero_stage", 0) >= 1:
            # DeepSpeed's consolidation unpickles with weights_only=False: select() has checked
            # every file of this checkpoint against the allowlist first.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            self.select(tag)
            state = get_fp32_state_dict_from_zero_checkpoint(self.dir, tag=tag)
        else:
            state = states["module"]
        return {k: v.float() for k, v in state.items()}


def _pipeline_state(model: torch.nn.Module, tag_dir: str) -> dict[str, torch.Tensor]:
    """Map each layer file of a PipelineModule back onto the plain model's parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    from megalm.models.pipeline import pipeline_layers

    for idx, layer in enumerate(pipeline_layers(model)):
        path = os.path.join(tag_dir, f"layer_{idx:02d}-model_states.pt")
        if not os.path.exists(path):
            raise UserError(f"{tag_dir}: pipeline checkpoint lacks {os.path.basename(path)}")
        saved = safe_load(path)
        for local, p in layer.named_parameters(remove_duplicate=False):
            if local not in saved:
                raise UserError(f"{path}: missing parameter {local}")
            out[names[id(p)]] = saved[local]
    return out


def resolve(path: str) -> tuple[CheckpointReader, str]:
    """(reader, tag) for a checkpoint directory, a checkpoint root (its newest valid one) or a
    run directory (its checkpoints/ root); the chosen checkpoint is verified."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint (expected a step_NNNNNNNN folder, a checkpoint root or a run "
                        f"directory)")
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file; expected a checkpoint folder (step_NNNNNNNN), a checkpoint root or a "
                        f"run directory")
    if TAG_RE.match(os.path.basename(path)):
        reader, tag = CheckpointReader(os.path.dirname(path)), os.path.basename(path)
    else:
        if not published_tags(path) and os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)):
            path = os.path.join(path, RUN_CHECKPOINTS)  # a run directory
        if not published_tags(path):
            raise UserError(f"{path}: holds no checkpoint yet (no {tag_for(100)}-style folder); point at a "
                            f"checkpoint folder, a checkpoint root or a run directory with saved checkpoints")
        reader, tag = CheckpointReader(path), None
    chosen = reader.select(tag)
    if chosen is None:
        raise UserError(f"{path}: no complete, verified checkpoint found (see the warnings above)")
    return reader, chosen[0]


def read_client_state(checkpoint: str) -> tuple[str, dict[str, Any]]:
    """(checkpoint folder, the client state the trainer saved there) for any path resolve()
    takes; verified, weights not read (a task whose sampler needs only its own saved state)."""
    reader, tag = resolve(checkpoint)
    return os.path.join(reader.dir, tag), reader.client_state(tag)


def plain_weights(reader: CheckpointReader, tag: str, model: torch.nn.Module,
                  meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The plain LLM's fp32 state from checkpoint `tag`; a LoRA run's adapters merged into it."""
    from megalm.models.lora import plain_items

    return dict(plain_items(reader.weights(tag, model).items(), meta.get("data", {})))


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain LLM with the checkpoint's weights (fp32), and the run's saved client state."""
    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM

    reader, tag = resolve(checkpoint)
    tag_dir = os.path.join(reader.dir, tag)
    meta = reader.client_state(tag)
    model = LLM(LLMConfig.from_dict(dict(meta["data"]["model_config"]), source=f"{tag_dir}: model_config"))
    state = plain_weights(reader, tag, model, meta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the recorded model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.float().eval(), meta


def load_tokenizer(meta: dict[str, Any]):
    """The training run's tokenizer: the recorded file if it is still there and unchanged, else
    the model bytes stored in the checkpoint (shard directory moved); sha256-checked either way."""
    import sentencepiece as spm

    data = meta["data"]
    path, want, stored = data["tokenizer_path"], data["tokenizer_sha256"], data.get("tokenizer_model")
    if want is None:  # `megalm import-hf` of a folder without a sentencepiece tokenizer.model
        raise UserError(f"checkpoint imported from {meta.get('imported_from', 'elsewhere')} has no sentencepiece "
                        f"tokenizer (the source folder had no tokenizer.model)")
    try:
        with open(path, "rb") as f:
            blob, problem = f.read(), "changed since training (sha256 differs from the checkpoint's)"
    except OSError as exc:
        blob, problem = None, f"unreadable ({exc.strerror})"
    if blob is not None and hashlib.sha256(blob).hexdigest() == want:
        return spm.SentencePieceProcessor(model_proto=blob)
    if stored is None:
        raise UserError(f"{path}: tokenizer recorded in the checkpoint is {problem}, and the checkpoint "
                        f"stores no copy of it")
    if hashlib.sha256(stored).hexdigest() != want:
        raise UserError(f"{path}: tokenizer is {problem}, and the copy stored in the checkpoint fails its "
                        f"sha256 check")
    return spm.SentencePieceProcessor(model_proto=stored)
