"""What the training loop trains: a `Task` supplies the model, the data and the loss.

The loop, engine and checkpointing only talk to this interface, so a different objective (SFT,
diffusion) plugs in by writing another Task; `LMTask` is next-token pretraining.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from megalm.errors import UserError
from megalm.train.config import TrainConfig

Batch = dict[str, torch.Tensor]


class Loader(Protocol):
    """Per optimizer step: a list of micro-batch dicts (this rank's share of the global batch)."""

    def __iter__(self) -> Iterator[list[Batch]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def skip(self, n: int) -> None: ...


class EvalLoader(Protocol):
    """Fixed eval micro batches, source by source (the loop weighs sources like the training blend)."""

    num_sources: int

    def source_batches(self, k: int) -> Iterator[Batch]: ...


class Task(Protocol):
    def build_model(self) -> nn.Module: ...
    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> Loader: ...
    def build_eval_loader(self, dp_rank: int, dp_world: int) -> EvalLoader: ...
    def loss(self, model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor: ...
    # Pipeline parallelism: the model as a layer list, the loss on the last stage's output, and
    # how a micro batch splits into (first-stage inputs, last-stage labels).
    def pipeline_layers(self, model: nn.Module) -> list[nn.Module]: ...
    def pipeline_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def pipeline_batch(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]: ...
    def fingerprint(self) -> dict[str, Any]: ...
    # Optional: `attach(engine, dp_rank, dp_world)` returning an object with
    # `after_step(step, applied)`, `state_dict()` (collective) and `load_state_dict(state)`: task
    # state that must follow the weights through checkpoints (the diffusion task's EMA).


def _manifest_tokenizer(shard_dir: str) -> Any:
    from megalm.data.manifest import load_manifest

    return load_manifest(shard_dir).tokenizer


class LMTask:
    """Next-token prediction over packed documents (labels -100 where there is no target)."""

    shard_kind = "text"  # the manifest `kind` this task reads

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._tok = _manifest_tokenizer(cfg.data.paths[0])
        self._tok_bytes: bytes | None = None
        self._model_config = self._resolve_model_config()

    def _resolve_model_config(self):
        from megalm.models.config import LLMConfig
        from megalm.models.presets import load_preset

        fields = dict(self.cfg.model)
        preset = fields.pop("preset", None)
        base: dict[str, Any] = {}
        if preset is not None:
            loaded = load_preset(preset)
            base = loaded.to_dict() if hasattr(loaded, "to_dict") else dict(loaded)
        base.update(fields)
        # The tokenizer decides the vocabulary; a preset's own vocab_size is for its tokenizer.
        if "vocab_size" not in fields:
            base["vocab_size"] = self._tok.vocab_size
        elif fields["vocab_size"] < self._tok.vocab_size:
            raise UserError(f"{self.cfg.source}: model.vocab_size: {fields['vocab_size']} is smaller than "
                            f"the tokenizer's vocabulary ({self._tok.vocab_size})")
        if self.cfg.parallel.activation_checkpointing:
            base["activation_checkpointing"] = 1
        mc = LLMConfig.from_dict(base, source=f"{self.cfg.source}: model")
        stages, layers = self.cfg.parallel.pipeline_stages, mc.n_layers + 2  # embedding, blocks, head
        if stages > layers:
            raise UserError(f"{self.cfg.source}: parallel.pipeline_stages: {stages} stages for a model of "
                            f"{layers} pipeline layers (embedding, {mc.n_layers} blocks, head); expected at most "
                            f"{layers}")
        if self.cfg.data.seq_len > mc.max_seq_len:
            if mc.positions == "learned" or "max_seq_len" in fields:
                raise UserError(f"{self.cfg.source}: data.seq_len: {self.cfg.data.seq_len} exceeds "
                                f"model.max_seq_len={mc.max_seq_len}")
            mc.max_seq_len = self.cfg.data.seq_len
        return mc

    def build_model(self) -> nn.Module:
        from megalm.models.llm import LLM

        model = LLM(self._model_config)
        if self.cfg.checkpoint.init_from:
            from megalm.train.init_from import load_init_weights

            load_init_weights(self.cfg.checkpoint.init_from, model, self._model_config.to_dict(), self._tok.sha256,
                              self.cfg.source)
        return model

    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> Loader:
        from megalm.data.loader import build_loader
        from megalm.data.manifest import check_token_ids, load_manifest

        # Ids the embedding cannot hold would fail deep inside the first step; name the shard.
        check_token_ids([load_manifest(p) for p in self.cfg.data.paths], self._model_config.vocab_size)
        return build_loader(dataclasses.replace(self.cfg.data, split=split), self.cfg.batch.global_batch,
                            self.cfg.batch.micro_batch, dp_rank, dp_world, kind=self.shard_kind)

    def build_eval_loader(self, dp_rank: int, dp_world: int) -> EvalLoader:
        from megalm.data.loader import build_eval_loader

        return build_eval_loader(self.cfg.data, self.cfg.batch.micro_batch, dp_rank, dp_world, kind=self.shard_kind)

    def loss(self, model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor:
        return model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                     labels=batch["labels"])

    def pipeline_layers(self, model: nn.Module) -> list[nn.Module]:
        # The head stops at the final norm; its `loss` (the engine's loss_fn) runs the fused CE.
        from megalm.models.pipeline import pipeline_layers

        return pipeline_layers(model, fused_loss=True)

    def pipeline_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss on logits; used only when the last pipeline layer has no `loss` of its own."""
        from megalm.models.pipeline import pipeline_loss

        return pipeline_loss(outputs, labels)

    def pipeline_batch(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (batch["input_ids"], batch["position_ids"], batch["doc_ids"]), batch["labels"]

    def tokenizer_model(self) -> bytes:
        """The sentencepiece model bytes (checked against the manifest's sha256), stored in
        checkpoints so `megalm sample` works after the shard directory moved."""
        import os

        from megalm.fsio import read_checked

        if self._tok_bytes is None:
            path = os.path.join(self.cfg.data.paths[0], self._tok.path)
            manifest = os.path.join(self.cfg.data.paths[0], "manifest.json")
            self._tok_bytes = read_checked(path, self._tok.sha256, f"{manifest}: tokenizer.sha256")
        return self._tok_bytes

    def fingerprint(self) -> dict[str, Any]:
        import os

        return {"shard_dirs": [os.path.abspath(p) for p in self.cfg.data.paths],
                "tokenizer_path": os.path.abspath(os.path.join(self.cfg.data.paths[0], self._tok.path)),
                "tokenizer_sha256": self._tok.sha256, "vocab_size": self._tok.vocab_size,
                "eos_id": self._tok.eos_id, "model_config": self._model_config.to_dict()}


def build_task(cfg: TrainConfig) -> Task:
    """The Task that `cfg.task` names (config.TASKS): lm, sft (megalm/train/sft.py), or diffusion
    (megalm/diffusion/task.py)."""
    if cfg.task == "sft":
        from megalm.train.sft import SFTTask

        return SFTTask(cfg)
    if cfg.task == "diffusion":
        from megalm.diffusion.task import DiffusionTask

        return DiffusionTask(cfg)
    return LMTask(cfg)
