"""`megalm import-hf DIR --out OUT`: a local Hugging Face Llama or GPT-2 folder (config.json +
safetensors, sharded or not) -> a megalm checkpoint root that `megalm sample`, `checkpoint.init_from`
and megalm.models.load.load_model read like any trained checkpoint:

    OUT/step_00000000/mp_rank_00_model_states.pt   {"module": fp32 weights, megalm's client state}
    OUT/step_00000000/manifest.json + COMPLETE      (sha256 per file, as the trainer writes)
    OUT/latest

A sentencepiece `tokenizer.model` in DIR is stored in the checkpoint (sample needs it); without one
the weights still import and sampling says what is missing. Names and layouts: megalm/export/arch.py.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import sentencepiece as spm
import torch

import megalm
from megalm.checkpoint.files import complete_directory
from megalm.checkpoint.layout import CLIENT_KEYS, LATEST, tag_for
from megalm.cliparse import Parser
from megalm.engine.layout import MODEL_STATES
from megalm.errors import UserError
from megalm.export.arch import GPT2_NAMES, LLAMA_NAMES, compile_names, rename
from megalm.export.outdir import staged_dir
from megalm.fsio import atomic_write, sha256_file
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM

SUPPORTED = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _cfg_error(path: str, key: str, got: Any, want: str) -> UserError:
    return UserError(f"{path}: {key} is {got!r}; megalm imports only {want}")


def megalm_config(hf: dict[str, Any], path: str) -> tuple[str, LLMConfig]:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        archs = ", ".join(hf.get("architectures") or []) or "none given"
        raise UserError(f"{path}: model_type {kind!r} (architectures: {archs}) is not supported; megalm imports "
                        f"{' and '.join(SUPPORTED.values())}")
    if kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _cfg_error(path, "rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "plain RoPE (default)")
        if hf.get("hidden_act", "silu") != "silu":
            raise _cfg_error(path, "hidden_act", hf["hidden_act"], "silu (SwiGLU)")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise _cfg_error(path, "attention_bias/mlp_bias", (hf.get("attention_bias"), hf.get("mlp_bias")),
                             "both true or both false")
        heads, dim = hf["num_attention_heads"], hf["hidden_size"]
        if hf.get("head_dim") not in (None, dim // heads):
            raise _cfg_error(path, "head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {dim // heads}")
        values = dict(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=hf.get("num_key_value_heads") or heads, mlp="swiglu",
                      mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      positions="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                      max_seq_len=hf.get("max_position_embeddings", 2048),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bias=bool(hf.get("attention_bias")),
                      init="normal", init_std=float(hf.get("initializer_range", 0.02)))
    else:
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _cfg_error(path, "activation_function", act, "gelu_new (GELU, tanh approximation)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise _cfg_error(path, key, hf[key], "false")
        if hf.get("scale_attn_weights") is False:
            raise _cfg_error(path, "scale_attn_weights", False, "true")
        dim = hf["n_embd"]
        values = dict(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                      mlp="gelu", mlp_hidden=hf.get("n_inner") or 4 * dim, norm="layernorm",
                      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), positions="learned",
                      max_seq_len=hf.get("n_positions", 1024), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                      bias=True, init_std=float(hf.get("initializer_range", 0.02)))
    return kind, LLMConfig.from_dict(values, source=f"{path}: megalm model config")


def _tensors(hf_dir: str) -> tuple[dict[str, str], str]:
    """{tensor name: safetensors file} and a description of the files."""
    # optional dependency (the export extra): only import-hf reads safetensors
    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                return dict(json.load(f)["weight_map"]), index
        except (ValueError, KeyError) as exc:
            raise UserError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    if os.path.exists(single):
        try:
            with safe_open(single, "pt") as f:
                return {k: "model.safetensors" for k in f.keys()}, single
        except Exception as exc:
            raise UserError(f"{single}: unreadable safetensors file ({exc})") from None
    other = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(hf_dir, n))]
    raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
                    + (f" (found {other[0]}: convert it to safetensors first; pickled weights are never loaded)"
                       if other else ""))


def _read(hf_dir: str, weight_map: dict[str, str]):
    """Yield (name, tensor), one file open at a time."""
    # optional dependency (the export extra): only import-hf reads safetensors
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        path = os.path.join(hf_dir, file)
        try:
            with safe_open(path, "pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})") from None


def megalm_weights(hf_dir: str, kind: str, cfg: LLMConfig, weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    prefix = "model." if kind == "llama" else "transformer."
    inverse = compile_names({hf: mg for mg, hf in (LLAMA_NAMES if kind == "llama" else GPT2_NAMES).items()})
    out: dict[str, torch.Tensor] = {}
    for name, t in _read(hf_dir, weight_map):
        full = name if name.startswith((prefix, "lm_head.")) else prefix + name  # a base-model save
        if full.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers (causal mask, RoPE table), not weights
        t = t.float()
        if kind == "gpt2" and ".attn.c_attn." in full:
            layer, param = full.split(".")[2], full.rsplit(".", 1)[1]
            parts = (t.t() if param == "weight" else t).split(cfg.dim, 0)
            for which, part in zip("qkv", parts):
                out[f"layers.{layer}.attention.w{which}.{param}"] = part.contiguous()
            continue
        mg = rename(full, inverse)
        if mg is None:
            raise UserError(f"{hf_dir}: tensor {name} has no counterpart in megalm's {SUPPORTED[kind]} mapping")
        conv = kind == "gpt2" and t.dim() == 2 and (".mlp." in full or ".c_proj." in full)
        out[mg] = t.t().contiguous() if conv else t
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def import_hf(hf_dir: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    hf_dir = os.path.abspath(hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except OSError as exc:
        raise UserError(f"{config_path}: cannot read ({exc.strerror}); expected a Hugging Face model folder") from None
    except ValueError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    kind, cfg = megalm_config(hf, config_path)
    weight_map, files = _tensors(hf_dir)
    state = megalm_weights(hf_dir, kind, cfg, weight_map)
    with torch.device("meta"):
        want = LLM(cfg).state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        raise UserError(f"{files}: weights do not fit the config (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in want.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise UserError(f"{files}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(t.shape)}")
    module = {k: state[k] for k in want}  # the model's state-dict order
    data = _tokenizer_fields(hf_dir, hf, cfg)
    write_checkpoint(out, module, data, {"imported_from": hf_dir}, overwrite=overwrite)
    return {"arch": kind, "tensors": len(module), "parameters": sum(t.numel() for t in module.values()),
            "tokenizer": data["tokenizer_sha256"] is not None}


def write_checkpoint(out: str, module: dict[str, torch.Tensor], data: dict[str, Any], extra: dict[str, Any],
                     precision: str = "fp32", overwrite: bool = False) -> None:
    """A one-rank, ZeRO-0 megalm checkpoint root at `out` holding weights `module` (state-dict
    order) and a client state with `data` (tokenizer fields + model_config, as the trainer records)."""
    client = {"step": 0, "data_step": 0, "tokens": 0, "data": data, "world_size": 1,
              "megalm_version": megalm.__version__, **extra,
              "config": {"name": os.path.basename(os.path.abspath(out)), "parallel": {"zero_stage": 0, "pipeline_stages": 1},
                         "precision": {"dtype": precision}}}
    tag = tag_for(0)
    with staged_dir(out, overwrite) as work:
        step_dir = os.path.join(work, tag)
        os.makedirs(step_dir)
        torch.save({"module": module, **client, CLIENT_KEYS: list(client)}, os.path.join(step_dir, MODEL_STATES))
        complete_directory(step_dir, [], {"tag": tag, "step": 0, "world_size": 1, "dp_world_size": 1, "zero_stage": 0,
                                          "pipeline_stages": 1, **extra})
        atomic_write(os.path.join(work, LATEST), tag + "\n")


def _tokenizer_fields(hf_dir: str, hf: dict[str, Any], cfg: LLMConfig) -> dict[str, Any]:
    path = os.path.join(hf_dir, "tokenizer.model")
    fields = {"tokenizer_path": None, "tokenizer_sha256": None, "tokenizer_model": None, "vocab_size": cfg.vocab_size,
              "eos_id": hf.get("eos_token_id"), "model_config": cfg.to_dict()}
    if os.path.exists(path):
        with open(path, "rb") as f:
            blob = f.read()
        try:
            sp = spm.SentencePieceProcessor(model_proto=blob)
        except Exception:
            raise UserError(f"{path}: not a sentencepiece model") from None
        if sp.vocab_size() > cfg.vocab_size:
            raise UserError(f"{path}: tokenizer mismatch: {sp.vocab_size()} pieces but config.json's vocab_size is "
                            f"{cfg.vocab_size}")
        fields.update(tokenizer_path=path, tokenizer_sha256=sha256_file(path), tokenizer_model=blob,
                      eos_id=sp.eos_id() if sp.eos_id() >= 0 else fields["eos_id"])
    if isinstance(fields["eos_id"], list):
        fields["eos_id"] = fields["eos_id"][0]
    return fields


def main(argv: list[str]) -> int:
    p = Parser(prog="megalm import-hf", description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="megalm checkpoint root to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = p.parse_args(argv)
    info = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"imported {info['arch']} ({info['parameters']:,} parameters) into {os.path.abspath(args.out)}"
          + ("" if info["tokenizer"] else " (no tokenizer.model in the source: `megalm sample` needs one)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
