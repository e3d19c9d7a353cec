"""`checkpoint.init_from`: start a run from another run's weights only (optimizer, step and data
position start fresh). Read through megalm.engine.layout, so any layout works (ZeRO 0-3,
pipeline, `megalm import-hf` output); a LoRA checkpoint is merged into plain weights first.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from megalm.engine.layout import read_client_state
from megalm.errors import UserError
from megalm.models.load import plain_weights

# Model fields that may differ from the saved ones: they do not change what the weights mean.
FREE_FIELDS = frozenset({"activation_checkpointing", "dropout", "init", "init_std"})


def model_differences(saved: dict[str, Any], ours: dict[str, Any], free: frozenset[str] = FREE_FIELDS) -> list[str]:
    """`model.K is A there, B here` for each architectural field that differs."""
    return [f"model.{k} is {saved.get(k)!r} there, {ours.get(k)!r} here"
            for k in sorted((set(saved) | set(ours)) - free) if saved.get(k) != ours.get(k)]


def load_init_weights(path: str, model: nn.Module, model_config: dict[str, Any], tokenizer_sha256: str | None,
                      source: str = "config") -> str:
    """Load the weights of checkpoint `path` into the plain `model` (in place); returns the
    checkpoint folder read. A model of another shape or another tokenizer is one UserError line."""
    where, meta = read_client_state(path)
    data = meta.get("data", {})
    saved = data.get("model_config")
    if saved is None:
        raise UserError(f"{source}: checkpoint.init_from: {where} records no LLM model_config (not a language "
                        f"model checkpoint)")
    # RoPE has no position table: a longer max_seq_len (a longer data.seq_len) fits the same weights.
    free = FREE_FIELDS | ({"max_seq_len"} if model_config.get("positions") == "rope" else set())
    diffs = model_differences(saved, model_config, frozenset(free))
    if diffs:
        raise UserError(f"{source}: checkpoint.init_from: {where} holds another model shape ({'; '.join(diffs)}); "
                        f"set the model section to the checkpoint's")
    theirs = data.get("tokenizer_sha256")
    if tokenizer_sha256 and theirs and theirs != tokenizer_sha256:
        raise UserError(f"{source}: checkpoint.init_from: {where} was trained with another tokenizer (sha256 "
                        f"{theirs[:12]}…, the data's is {tokenizer_sha256[:12]}…); prepare the data with "
                        f"--tokenizer {path}")
    missing, unexpected = model.load_state_dict(plain_weights(where, model, meta), strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: checkpoint.init_from: {where}: weights do not fit the model (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]})")
    return where
