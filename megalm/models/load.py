"""A trained run's plain LLM and tokenizer, from any checkpoint megalm.checkpoint.reader.resolve
takes (a step folder, a checkpoint root or a run directory): `megalm sample`, export, finetuning's
init_from and the tests read trained weights through here.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from megalm.engine import layout
from megalm.errors import UserError
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM
from megalm.models.lora import plain_items
from megalm.models.pipeline import pipeline_layers


def plain_weights(tag_dir: str, model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The plain LLM's fp32 state from checkpoint folder `tag_dir`; a LoRA run's adapters merged into it."""
    return dict(plain_items(layout.weights(tag_dir, meta, model, pipeline_layers).items(), meta.get("data", {})))


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain LLM with the checkpoint's weights (fp32), and the run's saved client state."""
    tag_dir, meta = layout.read_client_state(checkpoint)
    model = LLM(LLMConfig.from_dict(dict(meta["data"]["model_config"]), source=f"{tag_dir}: model_config"))
    state = plain_weights(tag_dir, model, meta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the recorded model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.float().eval(), meta


def load_tokenizer(meta: dict[str, Any]):
    """The training run's tokenizer: the recorded file if it is still there and unchanged, else
    the model bytes stored in the checkpoint (shard directory moved); sha256-checked either way."""
    import sentencepiece as spm  # loaded by the callers that tokenize, not by every import of this module

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
