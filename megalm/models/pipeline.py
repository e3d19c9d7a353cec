"""The LLM as an ordered list of layers for DeepSpeed's `PipelineModule`, sharing the model's parameters.

    layers = pipeline_layers(model, fused_loss=True)  # [EmbeddingPipe, BlockPipe x n_layers, HeadPipe]
    PipelineModule(layers=layers, loss_fn=layers[-1].loss, num_stages=...)

Every layer maps a tuple to a tuple so activations cross stage boundaries as plain tensors:
    EmbeddingPipe: (input_ids[, position_ids[, doc_ids]]) -> (hidden, position_ids[, doc_ids])
    BlockPipe:     (hidden, position_ids[, doc_ids])      -> (hidden, position_ids[, doc_ids])
    HeadPipe:      (hidden, position_ids[, doc_ids])      -> logits [B, T, V]
                   (with fused_loss=True: normed hidden [B, T, D]; use `layers[-1].loss` as loss_fn)
Each block rebuilds its RoPE tables and document mask from position_ids/doc_ids rather than
receiving them: a [B, 1, T, T] mask is far more to send between stages than the ids.
Running the list front to back computes exactly `model(input_ids, position_ids, doc_ids)` (and,
with fused_loss, `layers[-1].loss(outputs, labels)` exactly the model's loss).

Tied embeddings: `HeadPipe.proj` IS the model's `tok_embeddings` module (same Parameter), so
within one process the tie holds by construction. When the first and last layers land on
different pipeline stages, each stage holds its own copy of that weight; the trainer keeps the
copies equal with a DeepSpeed `TiedLayerSpec` on both ends (megalm.engine.runtime).

This module imports the model, never the other way round: the model knows nothing of pipelines.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megalm.errors import UserError
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM, Block, DocumentMask, default_position_ids, head_logits, head_loss, rope_for
from megalm.ops import cross_entropy

Activations = tuple[torch.Tensor, ...]


def _as_tuple(inputs) -> Activations:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class EmbeddingPipe(nn.Module):
    def __init__(self, model: LLM):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings
        self.pos_embeddings = model.pos_embeddings
        self.dropout = model.dropout

    def forward(self, inputs) -> Activations:
        inputs = _as_tuple(inputs)
        input_ids, rest = inputs[0], inputs[1:]
        position_ids = rest[0] if rest else default_position_ids(input_ids)
        # The model's own embed code, run on this module's (shared) submodules.
        return (LLM.embed(self, input_ids, position_ids), position_ids, *rest[1:])


class BlockPipe(nn.Module):
    def __init__(self, block: Block, config: LLMConfig):
        super().__init__()
        self.block = block
        self.config = config

    def forward(self, inputs) -> Activations:
        hidden, position_ids, *rest = _as_tuple(inputs)
        mask = DocumentMask(rest[0]) if rest else None
        rope = rope_for(self.config, position_ids, hidden.dtype)
        return (self.block(hidden, rope, mask), position_ids, *rest)


class HeadPipe(nn.Module):
    """Final norm + output projection. With `fused_loss` it stops after the norm and `loss` runs
    the projection inside the chunked fused CE, so [B, T, V] logits never exist on the last stage
    (GiBs per micro batch at a 128k vocabulary)."""

    def __init__(self, model: LLM, fused_loss: bool = False):
        super().__init__()
        self.norm = model.norm
        # nn.Linear [V, D] or, tied, the nn.Embedding [V, D] itself.
        self.proj = model.tok_embeddings if model.output is None else model.output
        self.tied = model.output is None
        self.fused_loss = fused_loss
        self.softcap = model.config.logit_softcap

    def forward(self, inputs) -> torch.Tensor:
        hidden = self.norm(_as_tuple(inputs)[0])
        return hidden if self.fused_loss else head_logits(hidden, self.proj.weight, self.softcap)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`loss_fn` for PipelineModule, right for either mode: mean CE over labels != -100."""
        if self.fused_loss:
            return head_loss(outputs, self.proj.weight, labels, self.softcap)
        return pipeline_loss(outputs, labels)


def pipeline_layers(model: LLM, fused_loss: bool = False) -> list[nn.Module]:
    """[embedding, block_0..block_{L-1}, final norm + head] sharing `model`'s parameters;
    `fused_loss`: the head leaves the projection to its `loss`, so full logits never exist."""
    if model.config.value_embeds:
        # Each table feeds a first and a last layer, which sit on different stages, and the
        # blocks would need the token ids: not carried between stages today.
        raise UserError("model.value_embeds: not supported with parallel.pipeline_stages > 1 yet; "
                        "set it to 0 or train without a pipeline")
    return [EmbeddingPipe(model), *(BlockPipe(b, model.config) for b in model.layers),
            HeadPipe(model, fused_loss)]


def pipeline_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for logits from HeadPipe: mean CE over labels != -100 (no fp32 logits copy)."""
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
