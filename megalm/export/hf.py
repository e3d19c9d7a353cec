"""`megalm export CKPT --format hf`: a Hugging Face model folder, streamed tensor by tensor.

    OUT/config.json                      LlamaForCausalLM or GPT2LMHeadModel (megalm/export/arch.py)
    OUT/generation_config.json
    OUT/model-0000x-of-0000y.safetensors + model.safetensors.index.json (or model.safetensors)
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
    OUT/README.md                        model card with the training facts

Peak memory is one output shard plus the tensor being read (megalm/export/source.py,
shards.py); OUT appears only when complete (outdir.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from data_prep.chat import ChatTemplate
from megalm.errors import UserError
from megalm.export.arch import architecture, hf_config, to_hf
from megalm.export.outdir import staged_dir
from megalm.export.shards import DEFAULT_MAX_SHARD_BYTES, write_sharded
from megalm.export.source import CheckpointTensors, Item
from megalm.export.tokenizer import SpmModel, write_hf_tokenizer
from megalm.models.load import load_tokenizer
from megalm.models.lora import is_adapter, plain_items

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_items(src: CheckpointTensors) -> Iterator[Item]:
    """The plain model's (name, tensor) items of a checkpoint: the one stream every export reads
    (a LoRA run's adapters are merged into it here)."""
    return plain_items(src.items(), src.meta.get("data", {}))


def output_dtype(src: CheckpointTensors, dtype: str | None) -> str:
    """`dtype` or, by default, the precision the run trained in."""
    return dtype or (src.precision if src.precision in DTYPES else "fp32")


def cast(items: Iterator[Item], dtype: torch.dtype) -> Iterator[Item]:
    for name, t in items:
        yield name, t.to(dtype) if t.is_floating_point() else t


def progress(total: int, desc: str):
    """A tqdm bar in bytes on stderr (tqdm leaves it out when stderr is not a terminal)."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=None)


def special_ids(spm: SpmModel) -> dict[str, int | None]:
    return {"bos": spm.bos_id, "eos": spm.eos_id, "pad": spm.pad_id}


def load_spm(src: CheckpointTensors) -> SpmModel:
    sp = load_tokenizer(src.meta)
    spm = SpmModel.parse(sp.serialized_model_proto(), f"{src.tag_dir}: tokenizer")
    if len(spm.pieces) > src.config.vocab_size:
        raise UserError(f"{src.tag_dir}: tokenizer mismatch: the tokenizer has {len(spm.pieces)} pieces but the "
                        f"model's vocab_size is {src.config.vocab_size}")
    return spm


def chat_template(src: CheckpointTensors) -> str | None:
    """The SFT run's recorded chat template as Jinja (None for a run without one)."""
    recorded = src.meta.get("data", {}).get("chat_template")
    if recorded is None:
        return None

    return ChatTemplate.from_dict(recorded, f"{src.tag_dir}: data.chat_template").jinja()


def model_card(src: CheckpointTensors, arch: str, dtype: str, stats: dict[str, int]) -> str:
    meta, cfg = src.meta, src.config
    run = meta.get("config", {})
    facts = {
        "architecture": "LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel",
        "parameters": f"{src.numel():,}",
        "training steps": meta.get("step"), "training tokens": meta.get("tokens"),
        "run": run.get("name"), "data": ", ".join(map(str, run.get("data", {}).get("paths", []))),
        "sequence length": run.get("data", {}).get("seq_len"), "precision (training)": src.precision,
        "weights dtype": dtype, "parallelism": f"{meta.get('world_size')} ranks, {src.layout}",
        "optimizer": run.get("optimizer", {}).get("name", "adamw"),
        "peak learning rate": run.get("optimizer", {}).get("lr"),
        "tokenizer sha256": meta.get("data", {}).get("tokenizer_sha256"),
        "megalm version": meta.get("megalm_version"), "source checkpoint": src.tag_dir,
    }
    facts.update(_losses(src))
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items() if v not in (None, ""))
    model_rows = "\n".join(f"| {k} | {v} |" for k, v in cfg.to_dict().items())
    return (f"---\nlibrary_name: transformers\ntags:\n- megalm\n- {arch}\n---\n\n"
            f"# {run.get('name') or 'megalm model'}\n\n"
            f"Exported by `megalm export` from a megalm training checkpoint; logits match megalm's own model.\n\n"
            f"## Training\n\n| fact | value |\n|---|---|\n{rows}\n\n"
            f"## megalm model config\n\n| key | value |\n|---|---|\n{model_rows}\n")


def _losses(src: CheckpointTensors) -> dict[str, Any]:
    """Loss figures from the run's summary.json (runs/<name>/summary.json), when it describes the
    exported step."""
    path = os.path.join(os.path.dirname(os.path.dirname(src.tag_dir)), "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    if summary.get("step") != src.meta.get("step"):
        return {}
    return {"last training loss": summary.get("last_loss"), "eval loss": summary.get("eval_loss")}


def export_hf(checkpoint: str, out: str, dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False) -> dict[str, Any]:
    """Export `checkpoint` to a Hugging Face folder at `out`; returns the shard statistics."""
    src = CheckpointTensors(checkpoint)
    arch = architecture(src.config, f"{src.tag_dir}: model_config")
    dtype = output_dtype(src, dtype)
    spm = load_spm(src)
    with staged_dir(out, overwrite) as work:
        write_hf_tokenizer(spm, work, f"{src.tag_dir}: tokenizer", src.config.max_seq_len, chat_template(src))
        with progress(src.numel(skip=is_adapter) * DTYPES[dtype].itemsize, "export") as bar:
            stats = write_sharded(to_hf(cast(model_items(src), DTYPES[dtype]), src.config, arch), work,
                                  max_shard_bytes, on_tensor=bar.update)
        _write_json(os.path.join(work, "config.json"), hf_config(src.config, arch, HF_DTYPE_NAMES[dtype],
                                                                   special_ids(spm)))
        gen = {f"{k}_token_id": v for k, v in special_ids(spm).items() if v is not None and v >= 0}
        _write_json(os.path.join(work, "generation_config.json"), gen)
        with open(os.path.join(work, "README.md"), "w") as f:
            f.write(model_card(src, arch, dtype, stats))
    return {**stats, "arch": arch, "dtype": dtype}


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")

