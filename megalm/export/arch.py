"""megalm's LLM <-> Hugging Face `LlamaForCausalLM` / `GPT2LMHeadModel`: which configs map, the
config.json of each, and the tensor names and layouts, both ways.

megalm's RoPE is already the "rotate halves" layout HF Llama uses (megalm/ops/rope.py), so q/k
weights map unchanged. GPT-2 keeps its weights as Conv1D `[in, out]` (transposed against
nn.Linear) and fuses q, k, v into `c_attn`; it always has biases, so a bias-free megalm model is
written with zero biases (the same function).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from megalm.errors import UserError
from megalm.models.config import LLMConfig

Item = tuple[str, torch.Tensor]

# megalm name template -> HF Llama name template ({i}: layer index, {p}: weight or bias).
LLAMA_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "layers.{i}.attention.wk.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "layers.{i}.attention.wv.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "layers.{i}.attention.wo.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "layers.{i}.feed_forward.w3.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "layers.{i}.feed_forward.w2.{p}": "model.layers.{i}.mlp.down_proj.{p}",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GPT-2: one-to-one names (Conv1D weights transposed); wq/wk/wv are fused into c_attn separately.
GPT2_NAMES = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "pos_embeddings.weight": "transformer.wpe.weight",
    "layers.{i}.attention_norm.{p}": "transformer.h.{i}.ln_1.{p}",
    "layers.{i}.attention.wo.{p}": "transformer.h.{i}.attn.c_proj.{p}",
    "layers.{i}.ffn_norm.{p}": "transformer.h.{i}.ln_2.{p}",
    "layers.{i}.feed_forward.w1.{p}": "transformer.h.{i}.mlp.c_fc.{p}",
    "layers.{i}.feed_forward.w2.{p}": "transformer.h.{i}.mlp.c_proj.{p}",
    "norm.{p}": "transformer.ln_f.{p}",
    "output.weight": "lm_head.weight",
}
_QKV = re.compile(r"layers\.(\d+)\.attention\.w([qkv])\.(weight|bias)$")


def compile_names(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        out.append((re.compile(pattern + "$"), dst))
    return out


def rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def architecture(cfg: LLMConfig, what: str) -> str:
    """"llama" or "gpt2" for a config HF can express exactly; one-line UserError otherwise."""
    for key, bad in (("qk_norm", cfg.qk_norm), ("logit_softcap", cfg.logit_softcap is not None)):
        if bad:
            raise UserError(f"{what}: model option {key} has no equivalent in LlamaForCausalLM or GPT2LMHeadModel; "
                            f"this model cannot be exported to Hugging Face or GGUF")
    if (cfg.positions, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    if (cfg.positions, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        if cfg.n_kv_heads != cfg.n_heads:
            raise UserError(f"{what}: GPT-2-style model with n_kv_heads={cfg.n_kv_heads} != n_heads={cfg.n_heads}: "
                            f"GPT2LMHeadModel has no grouped KV heads")
        return "gpt2"
    raise UserError(f"{what}: positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp} is neither Llama-style "
                    f"(rope, rmsnorm, swiglu) nor GPT-2-style (learned, layernorm, gelu): no Hugging Face architecture "
                    f"computes it exactly")


def hf_config(cfg: LLMConfig, arch: str, dtype: str, special: dict[str, int | None]) -> dict[str, Any]:
    ids = {f"{k}_token_id": v for k, v in special.items() if v is not None and v >= 0}
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0,
                "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "use_cache": True,
                "torch_dtype": dtype, **ids}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.ffn_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "use_cache": True,
            "torch_dtype": dtype, **ids}


def to_hf(items: Iterable[Item], cfg: LLMConfig, arch: str) -> Iterator[Item]:
    """megalm (name, tensor) items -> HF items, streaming (GPT-2 buffers one block's q, k, v)."""
    if arch == "llama":
        table = compile_names(LLAMA_NAMES)
        for name, t in items:
            out = rename(name, table)
            if out is None:
                raise UserError(f"checkpoint tensor {name}: no LlamaForCausalLM counterpart")
            yield out, t
        return
    table, pending = compile_names(GPT2_NAMES), {}
    for name, t in items:
        qkv = _QKV.match(name)
        if qkv:
            layer, which, kind = qkv.groups()
            pending[(which, kind)] = t
            if all((w, "weight") in pending for w in "qkv") and (not cfg.bias or all((w, "bias") in pending for w in "qkv")):
                w = torch.cat([pending.pop((x, "weight")) for x in "qkv"], 0)
                yield f"transformer.h.{layer}.attn.c_attn.weight", w.t().contiguous()
                b = torch.cat([pending.pop((x, "bias")) for x in "qkv"]) if cfg.bias else w.new_zeros(w.shape[0])
                yield f"transformer.h.{layer}.attn.c_attn.bias", b
            continue
        out = rename(name, table)
        if out is None:
            raise UserError(f"checkpoint tensor {name}: no GPT2LMHeadModel counterpart")
        conv = t.dim() == 2 and (".mlp." in out or ".c_proj." in out)
        yield out, t.t().contiguous() if conv else t
        if not cfg.bias and out.endswith(".weight") and out.startswith(("transformer.h.", "transformer.ln_f")):
            yield out[:-len("weight")] + "bias", t.new_zeros(t.shape[0])  # nn.Linear [out, in]: out
