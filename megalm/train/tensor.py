"""Tensor parallelism of a plain LLM (Megatron's split, applied by DeepSpeed AutoTP from outside):
in each block, wq/wk/wv and the MLP's input matrices w1/w3 are split by output features (column),
wo and w2 by input features (row), so a rank holds heads/N whole heads and ffn_hidden/N hidden
units, and each block costs one all-reduce after attention and one after the MLP (forward and
backward). Embeddings, norms and the head stay whole on every rank.

The plan is saved in each checkpoint's client state, so a reader puts the slices back together
without knowing the model (megalm.engine.layout)."""

from __future__ import annotations

from typing import Any

from megalm.errors import UserError

# Parameter-name patterns (re.match over state-dict names; AutoTP may see them under a prefix).
_BLOCK = r"^(?:.*\.)?layers\.\d+\."
COLUMN = [_BLOCK + r"attention\.w[qkv]\.weight$", _BLOCK + r"feed_forward\.w[13]\.weight$"]
ROW = [_BLOCK + r"attention\.wo\.weight$", _BLOCK + r"feed_forward\.w2\.weight$"]


def plan(size: int) -> dict[str, Any]:
    """What the checkpoint records: the TP size and which weights are split how. A split weight's
    bias follows it: split with a column weight, whole (added after the all-reduce) with a row one."""
    return {"size": size, "column": list(COLUMN), "row": list(ROW)}


def check_model(n_heads: int, n_kv_heads: int, ffn_hidden: int, value_embeds: int, tp: int) -> None:
    """Each rank must hold whole heads (and whole KV groups) and an equal share of the MLP."""
    if n_heads % tp or n_kv_heads % tp:
        raise UserError(f"parallel.tensor_parallel: {tp} must divide model.n_heads ({n_heads}) and "
                        f"model.n_kv_heads ({n_kv_heads})")
    if ffn_hidden % tp:
        raise UserError(f"parallel.tensor_parallel: {tp} must divide the MLP width ({ffn_hidden}, "
                        f"model.mlp_hidden, or derived from model.dim)")
    if value_embeds:
        raise UserError("parallel.tensor_parallel: model.value_embeds is not supported with tensor parallelism "
                        "yet (the value embeddings would need the same split as wv); expected 0")
