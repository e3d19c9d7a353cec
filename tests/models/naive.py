"""An explicit, slow re-implementation of the LLM forward for tests: no megalm.ops, no SDPA.

It reads the weights of an `LLM` by name and recomputes the logits with hand-written norms,
rotary embedding, per-head attention with an explicit masked softmax, and MLPs, so that a bug in
the model (or in an op it calls) shows up as a mismatch.
"""

from __future__ import annotations

import math

import torch


def _norm(x, weight, bias, kind, eps):
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def _rotate(x, positions, theta):
    """x [T, H, D]; positions [T]; pairs (i, i + D/2) rotate by positions * theta^(-2i/D)."""
    D = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        angle = positions.to(torch.float64) * theta ** (-2.0 * i / D)
        c, s = torch.cos(angle)[:, None].to(x.dtype), torch.sin(angle)[:, None].to(x.dtype)
        a, b = x[:, :, i], x[:, :, i + D // 2]
        out[:, :, i] = a * c - b * s
        out[:, :, i + D // 2] = b * c + a * s
    return out


def _linear(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def naive_logits(model, input_ids, position_ids=None, doc_ids=None):
    """Logits [B, T, V] computed one sequence at a time."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    B, T = input_ids.shape
    H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if position_ids is None:
        position_ids = torch.arange(T).expand(B, T)
    position_ids = position_ids.expand(B, T)
    head = sd["tok_embeddings.weight"] if cfg.tie_embeddings else sd["output.weight"]
    out = []
    for b in range(B):
        pos, ids = position_ids[b], input_ids[b]
        docs = doc_ids[b] if doc_ids is not None else torch.zeros(T, dtype=torch.long)
        x = sd["tok_embeddings.weight"][ids]
        if cfg.positions == "learned":
            x = x + sd["pos_embeddings.weight"][pos]
        for layer in range(cfg.n_layers):
            p = f"layers.{layer}."
            h = _norm(x, sd[p + "attention_norm.weight"], sd.get(p + "attention_norm.bias"), cfg.norm, cfg.norm_eps)
            q = _linear(h, sd, p + "attention.wq").view(T, H, D)
            k = _linear(h, sd, p + "attention.wk").view(T, Hk, D)
            v = _linear(h, sd, p + "attention.wv").view(T, Hk, D)
            # Value embeddings: the first k layers use tables 0..k-1, and so do the last k.
            first, last = layer, layer - (cfg.n_layers - cfg.value_embeds)
            table = first if first < cfg.value_embeds else last if last >= 0 else None
            if table is not None:
                lam = sd[p + "attention.ve_lambdas"]
                v = lam[0] * v + lam[1] * sd[f"value_embeddings.{table}.weight"][ids].view(T, Hk, D)
            if cfg.qk_norm:
                q = _norm(q, sd[p + "attention.q_norm"], None, "rmsnorm", cfg.norm_eps)
                k = _norm(k, sd[p + "attention.k_norm"], None, "rmsnorm", cfg.norm_eps)
            if cfg.positions == "rope":
                q, k = _rotate(q, pos, cfg.rope_theta), _rotate(k, pos, cfg.rope_theta)
            heads = []
            for hh in range(H):
                kv = hh // (H // Hk)  # query head hh reads KV head kv (GQA groups are contiguous)
                scores = torch.einsum("id,jd->ij", q[:, hh], k[:, kv]) / math.sqrt(D)
                allowed = torch.zeros(T, T, dtype=torch.bool)
                for i in range(T):
                    for j in range(i + 1):
                        allowed[i, j] = bool(docs[i] == docs[j])
                scores = scores.masked_fill(~allowed, float("-inf"))
                e = torch.exp(scores - scores.max(-1, keepdim=True).values)
                heads.append((e / e.sum(-1, keepdim=True)) @ v[:, kv])
            x = x + _linear(torch.cat(heads, dim=-1), sd, p + "attention.wo")
            h = _norm(x, sd[p + "ffn_norm.weight"], sd.get(p + "ffn_norm.bias"), cfg.norm, cfg.norm_eps)
            if cfg.mlp == "swiglu":
                g = _linear(h, sd, p + "feed_forward.w1")
                m = g * torch.sigmoid(g) * _linear(h, sd, p + "feed_forward.w3")
            elif cfg.mlp == "relu2":
                g = _linear(h, sd, p + "feed_forward.w1")
                m = torch.where(g > 0, g * g, torch.zeros_like(g))
            else:
                m = _gelu_tanh(_linear(h, sd, p + "feed_forward.w1"))
            x = x + _linear(m, sd, p + "feed_forward.w2")
        x = _norm(x, sd["norm.weight"], sd.get("norm.bias"), cfg.norm, cfg.norm_eps)
        logits = x @ head.T
        if cfg.logit_softcap is not None:
            c = cfg.logit_softcap
            e = torch.exp(2 * logits / c)  # tanh(z) = (e^2z - 1) / (e^2z + 1), written out
            logits = c * (e - 1) / (e + 1)
        out.append(logits)
    return torch.stack(out)


def naive_loss(logits, labels):
    """Mean over labels != -100 of -log softmax(logits)[label], explicitly."""
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = lab != -100
    z = flat[keep]
    logz = z.max(-1).values + torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1))
    return (logz - z[torch.arange(z.shape[0]), lab[keep]]).mean()
