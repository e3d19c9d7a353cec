"""What the training loop trains: a `Task` supplies the model, the data and the loss.

The loop, engine and checkpointing only talk to this interface, so a different objective (SFT,
diffusion) plugs in by writing another Task subclass and naming it in TASKS; `LMTask` is
next-token pretraining. The abstract methods are the contract; every other method is an optional
hook whose default is the plain case (no pipeline, no task state, no tokenizer to store).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch
import torch.nn as nn

from megalm.data.loader import build_eval_loader, build_loader
from megalm.data.manifest import check_token_ids, load_manifest
from megalm.errors import UserError
from megalm.fsio import read_checked
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM
from megalm.models.pipeline import pipeline_layers
from megalm.models.presets import load_preset
from megalm.train.config import TrainConfig, task_class
from megalm.train.init_from import load_init_weights
from megalm.train import tensor
from megalm.train.sequence import SequenceParallel, check_heads

Batch = dict[str, torch.Tensor]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Loader(Protocol):
    """Per optimizer step: a list of micro-batch dicts (this rank's share of the global batch)."""

    def __iter__(self) -> Iterator[list[Batch]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def skip(self, n: int) -> None: ...
    def source_weights(self) -> list[float]: ...  # each source's share of training (weighs eval losses)


class EvalLoader(Protocol):
    """Fixed eval micro batches, source by source (the loop weighs sources like the training blend)."""

    num_sources: int

    def source_batches(self, k: int) -> Iterator[Batch]: ...


class TaskHook:
    """A task's companion on the live engine: runs after each optimizer step and may carry state
    through checkpoints (the diffusion task's EMA) or add files to them (LoRA adapters alone).
    The defaults do nothing."""

    carries_state: ClassVar[bool] = False  # True: state_dict() is saved as the client state's task_state

    def after_step(self, step: int, applied: bool) -> None:
        """After each optimizer step (`applied`: False for a skipped bad step)."""

    def state_dict(self) -> dict[str, Any]:
        """Collective. What must follow the weights (saved when carries_state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state_dict() a checkpoint saved (called when carries_state)."""

    def checkpoint_files(self) -> dict[str, bytes]:
        """Collective. {file name: bytes} written into each checkpoint, in its manifest."""
        return {}


class Task(abc.ABC):
    """What one `task:` trains. Subclasses are constructed from the validated TrainConfig."""

    name: ClassVar[str]  # the `task:` value (TASKS)
    # The dataclass whose fields the `model:` section may set (besides `preset`), checked when the
    # config loads; None leaves the section to the task.
    model_config_class: ClassVar[type | None] = None
    sequence_parallel: ClassVar[bool] = False  # apply_sequence_parallel is implemented
    tensor_parallel: ClassVar[bool] = False  # tensor_parallel_plan is implemented

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The plain model (the same initial weights on every rank: the seed is set before)."""

    @abc.abstractmethod
    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> Loader:
        """This data-parallel rank's training batches of `split`."""

    @abc.abstractmethod
    def build_eval_loader(self, dp_rank: int, dp_world: int) -> EvalLoader:
        """This data-parallel rank's fixed eval batches."""

    @abc.abstractmethod
    def loss(self, model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor:
        """The scalar loss of one micro batch (`model` is the engine: call it like the model)."""

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data and model (saved as the client state's `data`; checked on
        resume). A `model_config` entry is compared field by field."""

    # -- optional hooks ------------------------------------------------------------------------
    def flops_per_token(self, model: nn.Module) -> int:
        """Model FLOPs per trained token (for MFU); 0 when unknown (MFU is then not logged)."""
        return 0

    def tokenizer_model(self) -> bytes | None:
        """Tokenizer bytes to store in checkpoints (`megalm sample` after the data moved)."""
        return None

    def saved_model_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's model_config as it was trained (a field added later, with its old value)."""
        return saved

    def attach(self, engine: Any, dp_rank: int, dp_world: int) -> TaskHook:
        """The hook the loop calls around steps and checkpoints (built once the engine exists)."""
        return TaskHook()

    def apply_sequence_parallel(self, model: nn.Module, group: Any) -> None:
        """Make `model` (in place, parameter names unchanged) take whole micro batches and return
        this rank's share of the loss over the sequence-parallel process group `group`."""
        raise UserError(f"parallel.sequence_parallel: task {self.name} does not run sequence-parallel")

    def tensor_parallel_plan(self) -> dict[str, Any]:
        """megalm.train.tensor.plan(): which weights DeepSpeed AutoTP splits how (saved in checkpoints)."""
        raise UserError(f"parallel.tensor_parallel: task {self.name} does not run tensor-parallel")

    # Pipeline parallelism: the model as a layer list, the loss on the last stage's output, and how
    # a micro batch splits into (first-stage inputs, last-stage labels). A task without these
    # refuses parallel.pipeline_stages > 1 when it is built.
    def pipeline_layers(self, model: nn.Module) -> list[nn.Module]:
        raise UserError(f"parallel.pipeline_stages: task {self.name} does not run as pipeline stages")

    def pipeline_loss(self, layers: list[nn.Module]) -> LossFn:
        """The loss on the last stage's output and the labels, given pipeline_layers' list."""
        raise UserError(f"parallel.pipeline_stages: task {self.name} does not run as pipeline stages")

    def pipeline_batch(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        raise UserError(f"parallel.pipeline_stages: task {self.name} does not run as pipeline stages")


def _manifest_tokenizer(shard_dir: str) -> Any:
    return load_manifest(shard_dir).tokenizer


class LMTask(Task):
    """Next-token prediction over packed documents (labels -100 where there is no target)."""

    name = "lm"
    model_config_class = LLMConfig
    sequence_parallel = True
    tensor_parallel = True
    shard_kind = "text"  # the manifest `kind` this task reads

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._tok = _manifest_tokenizer(cfg.data.paths[0])
        self._tok_bytes: bytes | None = None
        self._model_config = self._resolve_model_config()

    def _resolve_model_config(self):
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
        sp, tp = self.cfg.parallel.sequence_parallel, self.cfg.parallel.tensor_parallel
        try:
            if tp > 1:
                tensor.check_model(mc.n_heads, mc.n_kv_heads, mc.ffn_hidden, mc.value_embeds, tp)
            if sp > 1:  # each TP rank's heads are split again over the SP group
                check_heads(mc.n_heads, mc.n_kv_heads, sp, tp)
        except UserError as exc:
            raise UserError(f"{self.cfg.source}: {exc}") from None
        if self.cfg.data.seq_len > mc.max_seq_len:
            if mc.positions == "learned" or "max_seq_len" in fields:
                raise UserError(f"{self.cfg.source}: data.seq_len: {self.cfg.data.seq_len} exceeds "
                                f"model.max_seq_len={mc.max_seq_len}")
            mc.max_seq_len = self.cfg.data.seq_len
        return mc

    def build_model(self) -> nn.Module:
        model = LLM(self._model_config)
        if self.cfg.checkpoint.init_from:
            load_init_weights(self.cfg.checkpoint.init_from, model, self._model_config.to_dict(), self._tok.sha256,
                              self.cfg.source)
        return model

    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> Loader:
        # Ids the embedding cannot hold would fail deep inside the first step; name the shard.
        check_token_ids([load_manifest(p) for p in self.cfg.data.paths], self._model_config.vocab_size)
        return build_loader(dataclasses.replace(self.cfg.data, split=split), self.cfg.batch.global_batch,
                            self.cfg.batch.micro_batch, dp_rank, dp_world, kind=self.shard_kind)

    def build_eval_loader(self, dp_rank: int, dp_world: int) -> EvalLoader:
        return build_eval_loader(self.cfg.data, self.cfg.batch.micro_batch, dp_rank, dp_world, kind=self.shard_kind)

    def loss(self, model: Callable[..., torch.Tensor], batch: Batch) -> torch.Tensor:
        return model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                     labels=batch["labels"])

    def flops_per_token(self, model: nn.Module) -> int:
        return int(model.flops_per_token(self.cfg.data.seq_len))

    def apply_sequence_parallel(self, model: nn.Module, group: Any) -> None:
        SequenceParallel(model, group)

    def tensor_parallel_plan(self) -> dict[str, Any]:
        return tensor.plan(self.cfg.parallel.tensor_parallel)

    def pipeline_layers(self, model: nn.Module) -> list[nn.Module]:
        return pipeline_layers(model, fused_loss=True)

    def pipeline_loss(self, layers: list[nn.Module]) -> LossFn:
        # The head stops at the final norm and projects inside the chunked fused CE, so [B, T, V]
        # logits never exist on the last stage.
        return layers[-1].loss

    def pipeline_batch(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (batch["input_ids"], batch["position_ids"], batch["doc_ids"]), batch["labels"]

    def tokenizer_model(self) -> bytes | None:
        """The sentencepiece model bytes (checked against the manifest's sha256), stored in
        checkpoints so `megalm sample` works after the shard directory moved."""
        if self._tok_bytes is None:
            path = os.path.join(self.cfg.data.paths[0], self._tok.path)
            manifest = os.path.join(self.cfg.data.paths[0], "manifest.json")
            self._tok_bytes = read_checked(path, self._tok.sha256, f"{manifest}: tokenizer.sha256")
        return self._tok_bytes

    def fingerprint(self) -> dict[str, Any]:
        return {"shard_dirs": [os.path.abspath(p) for p in self.cfg.data.paths],
                "tokenizer_path": os.path.abspath(os.path.join(self.cfg.data.paths[0], self._tok.path)),
                "tokenizer_sha256": self._tok.sha256, "vocab_size": self._tok.vocab_size,
                "eos_id": self._tok.eos_id, "model_config": self._model_config.to_dict()}


def build_task(cfg: TrainConfig) -> Task:
    """The Task that `cfg.task` names."""
    return task_class(cfg.task)(cfg)
