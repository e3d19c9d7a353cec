"""The baseline a user would pick instead of megalm on one GPU: a nanoGPT-style model and loop in
plain PyTorch, eager or under torch.compile. Self-contained on purpose (nothing from megalm).

- `GPT2`: nanoGPT's model (learned positions, LayerNorm with bias, GELU MLP, tied head,
  `F.scaled_dot_product_attention(is_causal=True)`, full-logits `F.cross_entropy`).
- `Llama`: the same loop's Llama-style model (`F.rms_norm`, RoPE, SwiGLU, GQA through SDPA,
  tied head), for the ~1B comparison.
- `PlainLoop`: nanoGPT's train.py step: random windows of a flat uint16 token file (np.memmap),
  pinned and copied non-blocking, bf16 autocast, fused AdamW (decay on matrices), grad clip,
  `zero_grad(set_to_none=True)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class _GPT2Block(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.attn_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(_GPT2Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        _init(self, n_layers, ("attn_proj.weight", "mlp_proj.weight"))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class _LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int):
        super().__init__()
        self.h, self.kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.n1, self.n2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w13, self.w2 = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = F.rms_norm(x, (d,), self.n1, 1e-5)
        q, k, v = self.wqkv(y).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q, k = _rope(q.view(b, t, self.h, self.hd), cos, sin), _rope(k.view(b, t, self.kv, self.hd), cos, sin)
        v = v.view(b, t, self.kv, self.hd)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        gate, up = self.w13(F.rms_norm(x, (d,), self.n2, 1e-5)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate-half layout
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Llama(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden: int,
                 seq_len: int, rope_theta: float = 500000.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(dim))
        hd = dim // n_heads
        inv = 1.0 / rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(seq_len).float(), inv)[None, :, None, :]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        _init(self, n_layers, ("wo.weight", "w2.weight"))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        cos, sin = self.cos[:, : idx.shape[1]], self.sin[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5), self.emb.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _init(model: nn.Module, n_layers: int, residual: tuple[str, ...]) -> None:
    """nanoGPT's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual) else 0.02
            nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class PlainLoop:
    """nanoGPT's training step on one device."""

    def __init__(self, model: nn.Module, tokens: np.ndarray, micro_batch: int, seq_len: int, accum: int,
                 device: torch.device, compile: bool, lr: float = 6e-4, seed: int = 0):
        self.model = model.to(device)
        self.tokens, self.micro, self.seq, self.accum, self.device = tokens, micro_batch, seq_len, accum, device
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), fused=fused)
        self.forward = torch.compile(self.model) if compile else self.model
        self.rng = np.random.default_rng(seed)
        self.dtype = torch.bfloat16

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.rng.integers(0, len(self.tokens) - self.seq - 1, size=self.micro)
        x = torch.from_numpy(np.stack([self.tokens[i:i + self.seq].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([self.tokens[i + 1:i + 1 + self.seq].astype(np.int64) for i in ix]))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def step(self) -> None:
        x, y = self.batch()
        for _ in range(self.accum):
            with torch.autocast(self.device.type, dtype=self.dtype):
                loss = self.forward(x, y) / self.accum
            x, y = self.batch()  # the next micro batch's copy overlaps this backward (as nanoGPT)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
