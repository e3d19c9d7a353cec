"""`megalm prep --sft`: instruction/chat JSONL -> Arrow shards with a per-token loss mask.

Records: `{"prompt": ..., "response": ...}` (optional "system") or `{"messages": [{"role",
"content"}, ...]}`; `builtin:python-topics-qa` derives a small instruction set from Python's own
help topics. Each example is rendered with the chat template (data_prep/chat.py) and tokenized
with an existing tokenizer (the base model's). Same directory contract as the token shards
(docs/interfaces.md, "SFT shards"): one row per example, `tokens` and `loss_mask` columns with
equal lengths, train/valid split by a hash of the record, manifest (`kind: sft`) written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from pydoc_data import topics
from typing import Any

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.fsio import atomic_write, fsync_dir

from . import manifest as token_manifest
from .chat import ChatTemplate, encode_example, parse_example
from .outdir import output_error
from .readers import _open_binary
from .shards import remove_temp_files
from .tokenizer import describe, load_bytes, token_dtype

KIND = "sft"
TOPICS_QA = "builtin:python-topics-qa"


def wants_sft(argv: list[str]) -> bool:
    return "--sft" in argv


def topics_qa() -> Iterator[tuple[str, Any]]:
    """(where, record): one question per Python help topic, answered by the topic's first
    sentence (at most 200 characters) — deterministic for a Python version, no download."""
    for name in sorted(topics.topics):
        text = " ".join(topics.topics[name].split())
        if not text:
            continue
        end = text.find(". ")
        answer = text[: end + 1] if 0 < end < 200 else text[:200]
        yield f"{TOPICS_QA}:{name}", {"prompt": f"What is the Python help topic {name!r} about?",
                                      "response": answer}


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed JSON) of every non-empty line; a bad line is one UserError naming it."""
    if path == TOPICS_QA:
        yield from topics_qa()
        return

    try:
        f = _open_binary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}:{n}: not valid JSON ({exc})") from None


def _tokenizer_bytes(spec: str) -> bytes:
    """--tokenizer: a .model file, a shard directory (its tokenizer) or a megalm checkpoint."""
    # These import torch (2 s and ~190 MB): only a shard directory or checkpoint as --tokenizer needs them
    from megalm.data.manifest import load_manifest
    from megalm.engine.layout import read_client_state
    from megalm.models.load import load_tokenizer

    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, token_manifest.MANIFEST)):
        return load_bytes(load_manifest(spec).tokenizer.path)
    if os.path.isdir(spec):
        return load_tokenizer(read_client_state(spec)[1]).serialized_model_proto()
    return load_bytes(spec)


def _is_valid(record: Any, fraction: float) -> bool:
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "little") < int(fraction * 2**64)


def encode_shard(rows: list[tuple[list[int], list[int]]], dtype: str) -> bytes:
    lens = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    ids = pa.array(np.concatenate([np.asarray(i, dtype=dtype) for i, _ in rows]) if rows else np.zeros(0, dtype))
    mask = pa.array(np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in rows]) if rows
                    else np.zeros(0, np.uint8))
    schema = pa.schema([("tokens", pa.list_(ids.type)), ("loss_mask", pa.list_(pa.uint8()))])
    batch = pa.record_batch([pa.ListArray.from_arrays(offsets, ids), pa.ListArray.from_arrays(offsets, mask)],
                            schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def prepare(inputs: list[str], out: str, tokenizer: str, template: ChatTemplate, valid_fraction: float,
            shard_size_mb: float) -> dict:
    """Tokenize every record, write the shards and then the manifest; returns the manifest."""
    model = _tokenizer_bytes(tokenizer)
    sp = spm.SentencePieceProcessor(model_proto=model)
    info = describe(model)
    dtype = token_dtype(info["vocab_size"])
    rows: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "valid": []}
    for path in inputs:
        for where, record in read_records(path):
            turns = parse_example(record, where)
            ids, mask = encode_example(sp, template, turns, info["eos_id"])
            rows["valid" if _is_valid(record, valid_fraction) else "train"].append((ids, mask))
    if not rows["train"]:
        raise UserError(f"{', '.join(inputs)}: no training examples (empty input, or all went to valid)")
    out_path = Path(out)
    try:
        out_path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out_path)
        return _write(out_path, rows, model, info, dtype, template, shard_size_mb, inputs)
    except OSError as exc:
        raise output_error(out_path, exc) from None


def _write(out: Path, rows: dict, model: bytes, info: dict, dtype: str, template: ChatTemplate,
           shard_size_mb: float, inputs: list[str]) -> dict:
    atomic_write(out / token_manifest.TOKENIZER_FILE, model, sync_dir=False)
    per_token = np.dtype(dtype).itemsize + 1
    splits: dict[str, Any] = {}
    for name, examples in rows.items():
        shards, start, k = [], 0, 0
        while start < len(examples):
            stop, size = start, 0
            while stop < len(examples) and (stop == start or size < shard_size_mb * 2**20):
                size += len(examples[stop][0]) * per_token
                stop += 1
            part = examples[start:stop]
            blob = encode_shard(part, dtype)
            fname = f"{name}-{k:05d}.arrow"
            atomic_write(out / fname, blob, sync_dir=False)
            shards.append({"file": fname, "rows": len(part), "tokens": sum(len(i) for i, _ in part),
                           "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                           "max_token_id": max(max(i) for i, _ in part)})
            start, k = stop, k + 1
        splits[name] = {"documents": len(examples), "tokens": sum(len(i) for i, _ in examples), "shards": shards}
    lengths = [len(i) for ex in rows.values() for i, _ in ex]
    manifest = {"format": token_manifest.FORMAT, "format_version": token_manifest.FORMAT_VERSION, "kind": KIND,
                "tokenizer": {"path": token_manifest.TOKENIZER_FILE, **info}, "dtype": dtype, "splits": splits,
                "sft": {"template": template.to_dict(), "end_of_turn": "eos", "inputs": inputs},
                "stats": {"examples": len(lengths), "tokens": sum(lengths),
                          "trained_tokens": sum(sum(m) for ex in rows.values() for _, m in ex),
                          "tokens_per_example": token_manifest.percentiles(dict(Counter(lengths)))}}
    fsync_dir(out)
    token_manifest.write(out, manifest)  # last: its presence means the directory is complete
    return manifest


def main(argv: list[str]) -> int:
    p = Parser(prog="megalm prep --sft", description="Instruction/chat JSONL (.jsonl[.gz|.zst]: {prompt, response} "
                f"or {{messages: [{{role, content}}]}}, or {TOPICS_QA}) -> Arrow shards with a loss mask.")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--sft", action="store_true", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--tokenizer", required=True,
                   help="the base model's tokenizer: a .model file, a shard directory or a megalm checkpoint")
    p.add_argument("--chat-template", metavar="YAML", help="template strings overriding the defaults "
                   "(system_/user_/assistant_ prefix and suffix)")
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    args = p.parse_args(argv)
    if not 0.0 <= args.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction: expected 0 <= f < 1, got {args.valid_fraction}")
    if not args.shard_size_mb > 0:
        raise UserError(f"--shard-size-mb: expected > 0, got {args.shard_size_mb}")
    if os.path.exists(os.path.join(args.output, token_manifest.MANIFEST)):
        if not args.overwrite:
            raise UserError(f"{args.output}: already holds a shard directory; pass --overwrite to replace it")
        for old in Path(args.output).glob("*.arrow"):
            old.unlink()
        os.unlink(os.path.join(args.output, token_manifest.MANIFEST))
    template = ChatTemplate.load(args.chat_template) if args.chat_template else ChatTemplate()
    m = prepare(args.inputs, args.output, args.tokenizer, template, args.valid_fraction, args.shard_size_mb)
    s = m["stats"]
    print(f"{args.output}: {s['examples']} examples, {s['tokens']} tokens ({s['trained_tokens']} trained); "
          f"train {m['splits']['train']['documents']}, valid {m['splits']['valid']['documents']}")
    return 0
