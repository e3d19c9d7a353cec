"""A decoder-only transformer LM covering the GPT-2 and Llama families, readable top to bottom.

    LLM(config)(input_ids, position_ids=None, doc_ids=None, labels=None)
        -> logits [B, T, V], or the mean cross-entropy over labels != -100 when labels are given.

Packed batches: `position_ids` restart at each document start (RoPE / learned positions read
them) and `doc_ids` keep attention inside a document (causal AND same-document mask). Without
`doc_ids` attention takes the plain causal fast path.

Parallelism, precision and optimizer live outside this file; the only training concern here is
per-block activation checkpointing, because only the model knows where its blocks are.
Parameter names follow torchtitan's Llama (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, norm, output) so conversion adapters map them one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalm.models.config import LLMConfig
from megalm.models.generate import generate
from megalm.ops import apply_rope, cross_entropy, fused_linear_cross_entropy, layer_norm, rms_norm, rope_cos_sin, swiglu
from megalm.ops.doc_attention import document_attention, document_starts, kernel_will_run

__all__ = ["LLM", "LLMConfig", "Block", "DocumentMask", "default_position_ids", "document_mask", "head_logits",
           "head_loss"]

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B or 1, T, head_dim // 2]


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[1, T] positions 0..T-1 (one document per row); broadcasts over the batch."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask, True where query i may attend key j: j <= i and same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


class DocumentMask:
    """Causal AND same-document attention of packed rows, made on first use in the form the
    attention runs and then shared by every layer of the forward: per-token document starts for
    the document-masked CUDA kernel (megalm.ops.doc_attention, no T x T mask), or else the dense
    `document_mask` that SDPA takes."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        self._starts: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None

    def starts(self) -> torch.Tensor:
        if self._starts is None:
            self._starts = document_starts(self.doc_ids)
        return self._starts

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = document_mask(self.doc_ids)
        return self._dense


def rope_for(config: LLMConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> Rope | None:
    if config.positions != "rope":
        return None
    # At least fp32 tables: the op rotates in fp32 (fp64 for fp64 activations) whatever the
    # activation dtype, and bf16 angles would lose the phase at long positions.
    table_dtype = torch.promote_types(dtype, torch.float32)
    return rope_cos_sin(position_ids, config.head_dim, config.rope_theta, dtype=table_dtype)


def head_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Output projection, then (when set) Gemma-2's soft cap: softcap * tanh(logits / softcap)."""
    logits = F.linear(h, weight)
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Mean cross-entropy over labels != -100 of `head_logits(h, weight, softcap)`."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if softcap is None:
        # Chunked over tokens: the [N, V] logits never exist in full.
        return fused_linear_cross_entropy(h, weight, labels)
    # The fused op has no cap inside its chunks, so capped logits are materialised once.
    return cross_entropy(head_logits(h, weight, softcap), labels)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim (LayerNorm has a bias when config.bias)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.dim))
        has_bias = config.norm == "layernorm" and config.bias
        self.bias = nn.Parameter(torch.zeros(config.dim)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return rms_norm(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


class AttentionCore(nn.Module):
    """softmax(q kᵀ / √d + mask) v over [B, T, heads, D] tensors (mask None: causal). Heads are
    independent, so sequence parallelism (megalm.engine.sequence) swaps this module for one that
    runs it on every position of a slice of the heads."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | DocumentMask | None) -> torch.Tensor:
        if isinstance(mask, DocumentMask):
            if not (self.training and self.dropout) and kernel_will_run(q, k, v):
                return document_attention(q, k, v, mask.starts())
            mask = mask.dense()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        T = q.shape[2]
        gqa = k.shape[1] != q.shape[1]
        if gqa and mask is not None:
            # SDPA's enable_gqa with a mask falls back to the O(T^2)-memory math kernel; copying
            # the KV heads keeps the memory-efficient kernel eligible.
            rep = q.shape[1] // k.shape[1]
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        return y.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (n_kv_heads < n_heads: GQA; == 1: MQA)."""

    def __init__(self, config: LLMConfig, value_embed: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.bias)
        self.core = AttentionCore(config.dropout)
        # QK-norm (OLMo-2 / modded-nanogpt): RMSNorm of each head's q and k, before RoPE, bounds
        # the attention logits so higher learning rates stay stable.
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.norm_eps = config.norm_eps
        # Value embeddings (modded-nanogpt): learned weights of the projected values and of the
        # token's value embedding, v = l0 * wv(x) + l1 * ve; both start at 0.5.
        self.ve_lambdas = nn.Parameter(torch.full((2,), 0.5)) if value_embed else None

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
                cache=None, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads by what the projections return: under tensor parallelism a rank holds a slice of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.ve_lambdas is not None:
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve.view_as(v)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.norm_eps), rms_norm(k, self.k_norm, self.norm_eps)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        if cache is not None:
            # The whole prefix so far (the cache holds [B, Hk, S, D]).
            k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2)))
            S = k.shape[1]
            if mask is None and 1 < T < S:
                # New queries appended to a cached prefix: causal aligned to the end of the keys
                # (SDPA's is_causal would align to the start).
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        return self.wo(self.core(q, k, v, mask).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x), Llama), GELU (w2(gelu(w1 x)), GPT-2's tanh approximation) or
    ReLU² (w2(relu(w1 x)^2), Primer / modded-nanogpt)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=config.bias)
        self.w2 = nn.Linear(hidden, config.dim, bias=config.bias)
        self.w3 = nn.Linear(config.dim, hidden, bias=config.bias) if config.mlp == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(swiglu(self.w1(x), self.w3(x)))
        if self.kind == "relu2":
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LLMConfig, checkpointed: bool = False, value_embed: bool = False):
        super().__init__()
        self.attention_norm = Norm(config)
        self.attention = Attention(config, value_embed)
        self.ffn_norm = Norm(config)
        self.feed_forward = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None,
                cache=None, ve: torch.Tensor | None = None) -> torch.Tensor:
        """`ve`: this layer's value embedding [B, T, n_kv_heads * head_dim] (value_embeds layers only)."""
        if self.checkpointed and self.training and torch.is_grad_enabled() and cache is None:
            # Non-reentrant: works with inputs that need no grad and restores the dropout RNG.
            return checkpoint(self._forward, x, rope, mask, None, ve, use_reentrant=False)
        return self._forward(x, rope, mask, cache, ve)

    def _forward(self, x, rope, mask, cache, ve):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), rope, mask, cache, ve))
        return x + self.resid_dropout(self.feed_forward(self.ffn_norm(x)))


class LLM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = (nn.Embedding(config.max_seq_len, config.dim)
                               if config.positions == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        every = config.activation_checkpointing
        self.layers = nn.ModuleList(Block(config, checkpointed=every > 0 and i % every == 0,
                                          value_embed=config.value_embed_table(i) is not None)
                                    for i in range(config.n_layers))
        # Outside `layers` on purpose: Muon updates only the blocks' matrices, these are embeddings.
        kv_dim = config.n_kv_heads * config.head_dim
        self.value_embeddings = nn.ModuleList(nn.Embedding(config.vocab_size, kv_dim)
                                              for _ in range(config.value_embeds))
        self.norm = Norm(config)
        # Tied: the token embedding matrix [V, D] doubles as the output projection.
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after `to_empty()` when built on the meta device."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Attention):
                if module.q_norm is not None:
                    nn.init.ones_(module.q_norm)
                    nn.init.ones_(module.k_norm)
                if module.ve_lambdas is not None:
                    nn.init.constant_(module.ve_lambdas, 0.5)
        if self.config.init == "scaled_normal":
            # GPT-2: each block adds two residual branches, so their output projections shrink
            # by sqrt(2 * n_layers) to keep the residual stream's variance independent of depth.
            resid_std = std / math.sqrt(2 * self.config.n_layers)
            for block in self.layers:
                nn.init.normal_(block.attention.wo.weight, mean=0.0, std=resid_std)
                nn.init.normal_(block.feed_forward.w2.weight, mean=0.0, std=resid_std)
        if self.config.zero_init_proj:
            # modded-nanogpt: every block starts as the identity on the residual stream; the
            # projections still get gradients (their inputs are non-zero), so they learn at once.
            for block in self.layers:
                nn.init.zeros_(block.attention.wo.weight)
                nn.init.zeros_(block.feed_forward.w2.weight)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(position_ids)
        return self.dropout(h)

    def layer_value_embeds(self, input_ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer: its value embedding of `input_ids`, or None (each table looked up once)."""
        tables = [table(input_ids) for table in self.value_embeddings]
        picks = (self.config.value_embed_table(i) for i in range(len(self.layers)))
        return [None if i is None else tables[i] for i in picks]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        h = self.embed(input_ids, position_ids)
        rope = rope_for(self.config, position_ids, h.dtype)
        mask = DocumentMask(doc_ids) if doc_ids is not None else None
        for block, ve in zip(self.layers, self.layer_value_embeds(input_ids)):
            h = block(h, rope, mask, ve=ve)
        h = self.norm(h)
        if labels is None:
            return head_logits(h, self.head_weight, self.config.logit_softcap)
        return head_loss(h, self.head_weight, labels, self.config.logit_softcap)

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: list) -> torch.Tensor:
        """Run new tokens against a KV cache (one entry per block); logits [B, V] of the last token."""
        h = self.embed(input_ids, position_ids)
        rope = rope_for(self.config, position_ids, h.dtype)
        for block, layer_cache, ve in zip(self.layers, cache, self.layer_value_embeds(input_ids)):
            h = block(h, rope, None, layer_cache, ve)
        return head_logits(self.norm(h[:, -1]), self.head_weight, self.config.logit_softcap)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `idx` [B, T]; greedy when temperature == 0. See megalm.models.generate."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_id=eos_id, generator=generator)

    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 * n_layers * dim * seq_len.

        N counts the parameters used in matmuls: all but the position table, the value embeddings
        and, when untied, the input embedding (lookups cost no FLOPs); the output projection is
        included. The
        attention term counts the full T x T scores (no causal discount), as PaLM and Megatron do,
        so MFU figures compare with theirs.
        """
        n = self.num_params()
        if self.pos_embeddings is not None:
            n -= self.pos_embeddings.weight.numel()
        if self.output is not None:
            n -= self.tok_embeddings.weight.numel()
        n -= sum(table.weight.numel() for table in self.value_embeddings)
        cfg = self.config
        return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
