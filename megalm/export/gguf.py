"""`megalm export CKPT --format gguf`: one GGUF file (llama.cpp's format) through the `gguf`
package's own writer, streamed: the tensor table is declared from the model's shapes first, then
each tensor is written as it is read, so memory stays at one tensor.

Architecture "llama" (Llama-style megalm models). llama.cpp's llama graph rotates interleaved
pairs (x[2i], x[2i+1]) where megalm and HF rotate halves (x[i], x[i + D/2]); the q and k
projection rows of every head are permuted so the interleaved rotation of the permuted q equals
the permuted half rotation of the original (the permutation llama.cpp's own HF converter applies).
Norm weights are stored as F32 whatever --dtype says, as llama.cpp's converter does.
The file is `OUT/model.gguf` (OUT appears only when complete, like every export).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from megalm.errors import UserError
from megalm.export.arch import architecture, compile_names, rename
from megalm.export.hf import DTYPES, load_spm, model_items, output_dtype, progress
from megalm.export.outdir import staged_dir
from megalm.export.source import CheckpointTensors, Item
from megalm.export.tokenizer import UNUSED, SpmModel
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM

GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.{p}": "blk.{i}.attn_q.{p}",
    "layers.{i}.attention.wk.{p}": "blk.{i}.attn_k.{p}",
    "layers.{i}.attention.wv.{p}": "blk.{i}.attn_v.{p}",
    "layers.{i}.attention.wo.{p}": "blk.{i}.attn_output.{p}",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.{p}": "blk.{i}.ffn_gate.{p}",
    "layers.{i}.feed_forward.w3.{p}": "blk.{i}.ffn_up.{p}",
    "layers.{i}.feed_forward.w2.{p}": "blk.{i}.ffn_down.{p}",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
FILE_NAME = "model.gguf"


def interleave_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves layout [x0..x(D/2-1), y0..] to pairs [x0, y0, x1, y1, ...]
    (works on a weight [H*D, in] or a bias [H*D])."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_items(items: Iterator[Item], cfg: LLMConfig) -> Iterator[Item]:
    table = compile_names(GGUF_NAMES)
    for name, t in items:
        out = rename(name, table)
        if out is None:
            raise UserError(f"checkpoint tensor {name}: no GGUF llama counterpart")
        if ".attn_q." in out:
            t = interleave_heads(t, cfg.n_heads)
        elif ".attn_k." in out:
            t = interleave_heads(t, cfg.n_kv_heads)
        yield out, t


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _vocab(spm: SpmModel, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """The tokenizer padded to the model's vocab_size with unused pieces (llama.cpp requires one
    token per embedding row)."""
    pad = vocab_size - len(spm.pieces)
    return (spm.pieces + [f"[PAD{i}]" for i in range(pad)], spm.scores + [0.0] * pad, spm.types + [UNUSED] * pad)


def export_gguf(checkpoint: str, out: str, dtype: str | None = None, overwrite: bool = False) -> dict[str, object]:
    # optional dependency (the export extra): only this format needs it
    import gguf

    src = CheckpointTensors(checkpoint)
    cfg, what = src.config, f"{src.tag_dir}: model_config"
    if architecture(cfg, what) != "llama":
        raise UserError(f"{what}: GGUF export writes llama.cpp's llama architecture; this GPT-2-style model "
                        f"(learned positions, layernorm, gelu) is not one (use --format hf)")
    dtype = output_dtype(src, dtype)
    spm = load_spm(src)

    with torch.device("meta"):
        plan = list(gguf_items(iter(LLM(cfg).state_dict().items()), cfg))
    raw = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
           "bf16": gguf.GGMLQuantizationType.BF16}
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    with staged_dir(out, overwrite) as work:
        writer = gguf.GGUFWriter(os.path.join(work, FILE_NAME), "llama")
        name = src.meta.get("config", {}).get("name") or "megalm"
        writer.add_name(name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.ffn_hidden)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        tokens, scores, types = _vocab(spm, cfg.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        for key, idx in (("bos", spm.bos_id), ("eos", spm.eos_id), ("unk", spm.unk_id), ("pad", spm.pad_id)):
            if idx >= 0:
                getattr(writer, f"add_{key}_token_id")(idx)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        target = {n: torch.float32 if _is_norm(n) or t.dim() == 1 else DTYPES[dtype] for n, t in plan}
        for n, t in plan:
            kind = gguf.GGMLQuantizationType.F32 if target[n] == torch.float32 else raw[dtype]
            itemsize = target[n].itemsize
            writer.add_tensor_info(n, list(t.shape), np.dtype(np.float32 if itemsize == 4 else np.float16),
                                   t.numel() * itemsize, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        expected = iter(plan)
        with progress(sum(t.numel() for _, t in plan) * DTYPES[dtype].itemsize, "export") as bar:
            for n, t in gguf_items(model_items(src), cfg):
                want, shape = next(expected, (None, None))
                if n != want or t.shape != shape.shape:
                    raise UserError(f"{src.tag_dir}: tensor {n} {tuple(t.shape)} arrived where the model's layout "
                                    f"expects {want}")
                t = t.detach().to(target[n]).contiguous()
                writer.write_tensor_data((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
                bar.update(t.numel() * t.element_size())
        missing = next(expected, None)
        if missing is not None:
            raise UserError(f"{src.tag_dir}: checkpoint ends before tensor {missing[0]}")
        writer.close()
    return {"arch": "llama", "dtype": dtype, "tensors": len(plan)}
