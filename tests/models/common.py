"""Small model shapes shared by the model tests (seconds on one CPU core)."""

from __future__ import annotations

import torch

from megalm.models.llm import LLM, LLMConfig

# Llama-like: RoPE, RMSNorm, SwiGLU, GQA (4 query heads share 2 KV heads), untied.
LLAMA = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp="swiglu", multiple_of=16,
             max_seq_len=64)
# GPT-2-like: learned positions, LayerNorm with bias, GELU, biases, tied head.
GPT2 = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, mlp="gelu", norm="layernorm", positions="learned",
            tie_embeddings=True, bias=True, max_seq_len=64)
# MQA: one KV head for all query heads; RoPE with LayerNorm without bias, tied.
MQA = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, mlp="swiglu", norm="layernorm",
           mlp_hidden=48, tie_embeddings=True, max_seq_len=64)
SHAPES = {"llama": LLAMA, "gpt2": GPT2, "mqa": MQA}


def build(shape: str, dtype=torch.float64, seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    model = LLM(LLMConfig(**{**SHAPES[shape], **overrides})).to(dtype)
    # Non-trivial norm weights/biases so a norm that ignored them would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def packed_batch(doc_lengths: list[int], vocab: int = 61, seed: int = 1):
    """One packed row: input_ids, position_ids (restart per doc), doc_ids, labels (next token
    inside the document, -100 on each document's last token), each [1, T]."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, docs, labels = [], [], [], []
    for d, n in enumerate(doc_lengths):
        toks = torch.randint(0, vocab, (n,), generator=g)
        ids.append(toks)
        pos.append(torch.arange(n))
        docs.append(torch.full((n,), d))
        labels.append(torch.cat([toks[1:], torch.tensor([-100])]))
    return tuple(torch.cat(t).unsqueeze(0) for t in (ids, pos, docs, labels))
