"""Autoregressive generation with a KV cache: one prefill pass over the prompt, then one token per step."""

from __future__ import annotations

import torch

from megalm.errors import UserError


class LayerKVCache:
    """Keys/values of one block, [B, Hk, S, D], filled left to right; allocated on first use so it
    takes the dtype the attention actually produces (e.g. bf16 under autocast)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, D)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else sampled from the
    temperature-scaled distribution restricted to the top_k tokens and the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise UserError(f"temperature: expected >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k: expected an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p: expected a number in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each row of `idx` [B, T]; returns [B, T + n], n <= max_new_tokens.

    Stops early once every row has produced `eos_id`; rows that finished keep emitting eos_id so
    the batch stays rectangular.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise UserError(f"prompt: expected token ids [batch, length>0], got shape {tuple(idx.shape)}")
    B, T0 = idx.shape
    limit = model.config.max_seq_len
    if T0 + max_new_tokens > limit:
        raise UserError(f"max_new_tokens: prompt length {T0} + max_new_tokens {max_new_tokens} "
                        f"exceeds the model's max_seq_len={limit}")
    was_training = model.training
    model.eval()
    try:
        cache = [LayerKVCache(T0 + max_new_tokens) for _ in model.layers]
        positions = torch.arange(T0, device=idx.device).unsqueeze(0)
        logits = model.forward_cached(idx, positions, cache)
        out = [idx]
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            out.append(nxt.unsqueeze(1))
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            positions = torch.full((1, 1), T0 + step, device=idx.device)
            logits = model.forward_cached(nxt.unsqueeze(1), positions, cache)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
