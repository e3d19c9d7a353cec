"""Read and validate a shard directory's `manifest.json` (contract: docs/interfaces.md).

Only the JSON is checked here; the Arrow shards are checked against it in `shards.py`.
Every error names the manifest file and the key at fault, because the user has to find and fix it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from megalm.errors import UserError

FORMAT = "megalm-shards"
FORMAT_VERSION = 1
DTYPES = {"uint16": 65536, "uint32": 2**32}
KINDS = ("text", "sft")  # text: documents to pack; sft: examples with a loss mask


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # absolute path of the tokenizer.model copy inside the shard dir
    sha256: str
    vocab_size: int
    eos_id: int


@dataclass(frozen=True)
class ShardInfo:
    file: str  # absolute path
    rows: int
    tokens: int
    bytes: int
    sha256: str
    max_token_id: int | None = None  # None: written before prep recorded it


@dataclass(frozen=True)
class SplitInfo:
    name: str
    documents: int
    tokens: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    dir: str
    path: str  # the manifest.json itself, for error messages
    tokenizer: TokenizerInfo
    dtype: str
    splits: dict[str, SplitInfo]
    sha256: str  # of manifest.json bytes (informational; resume checks use the shard hashes)
    kind: str = "text"  # "sft": rows also carry a loss_mask column (megalm prep --sft)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(
                f"{self.path}: splits.{name}: no such split (has: {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[name]


def _get(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, path: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{path}: {where}{key}: missing")
    val = obj[key]
    # bool is an int subclass; a count given as true/false is a producer bug worth naming
    if isinstance(val, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise UserError(f"{path}: {where}{key}: expected {_tname(typ)}, got {val!r}")
    if not isinstance(val, typ):
        raise UserError(f"{path}: {where}{key}: expected {_tname(typ)}, got {type(val).__name__} {val!r}")
    return val


def _tname(typ: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__


def _nonneg(val: int, key: str, path: str) -> int:
    if val < 0:
        raise UserError(f"{path}: {key}: expected a count >= 0, got {val}")
    return val


def _parse_split(name: str, obj: Any, dir_: str, path: str) -> SplitInfo:
    where = f"splits.{name}."
    if not isinstance(obj, dict):
        raise UserError(f"{path}: splits.{name}: expected an object")
    documents = _nonneg(_get(obj, "documents", int, where, path), where + "documents", path)
    tokens = _nonneg(_get(obj, "tokens", int, where, path), where + "tokens", path)
    shards_raw = _get(obj, "shards", list, where, path)
    shards = []
    for i, s in enumerate(shards_raw):
        sw = f"{where}shards[{i}]."
        if not isinstance(s, dict):
            raise UserError(f"{path}: {where}shards[{i}]: expected an object")
        fname = _get(s, "file", str, sw, path)
        if os.path.isabs(fname) or os.sep in fname or fname in ("", ".", ".."):
            raise UserError(f"{path}: {sw}file: expected a file name inside the shard dir, got {fname!r}")
        shards.append(
            ShardInfo(
                file=os.path.join(dir_, fname),
                rows=_nonneg(_get(s, "rows", int, sw, path), sw + "rows", path),
                tokens=_nonneg(_get(s, "tokens", int, sw, path), sw + "tokens", path),
                bytes=_nonneg(_get(s, "bytes", int, sw, path), sw + "bytes", path),
                sha256=_get(s, "sha256", str, sw, path),
                max_token_id=(_nonneg(_get(s, "max_token_id", int, sw, path), sw + "max_token_id", path)
                              if "max_token_id" in s else None),
            )
        )
    if sum(s.rows for s in shards) != documents:
        raise UserError(
            f"{path}: {where}documents: {documents} but its shards' rows sum to {sum(s.rows for s in shards)}"
        )
    if sum(s.tokens for s in shards) != tokens:
        raise UserError(f"{path}: {where}tokens: {tokens} but its shards' tokens sum to {sum(s.tokens for s in shards)}")
    return SplitInfo(name=name, documents=documents, tokens=tokens, shards=tuple(shards))


def load_manifest(shard_dir: str) -> Manifest:
    """Parse and validate `<shard_dir>/manifest.json`; raises UserError naming file and key."""
    dir_ = os.path.abspath(shard_dir)
    path = os.path.join(dir_, "manifest.json")
    if not os.path.isdir(dir_):
        raise UserError(f"{dir_}: expected a shard directory (made by `megalm prep`), found none")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the shard directory is incomplete (manifest.json is written last)") from None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")

    fmt = _get(obj, "format", str, "", path)
    if fmt != FORMAT:
        raise UserError(f"{path}: format: expected {FORMAT!r}, got {fmt!r}")
    ver = _get(obj, "format_version", int, "", path)
    if ver != FORMAT_VERSION:
        raise UserError(f"{path}: format_version: this megalm reads version {FORMAT_VERSION}, got {ver}")

    tok = _get(obj, "tokenizer", dict, "", path)
    tok_file = _get(tok, "path", str, "tokenizer.", path)
    vocab_size = _get(tok, "vocab_size", int, "tokenizer.", path)
    eos_id = _get(tok, "eos_id", int, "tokenizer.", path)
    if vocab_size <= 0:
        raise UserError(f"{path}: tokenizer.vocab_size: expected > 0, got {vocab_size}")
    if not 0 <= eos_id < vocab_size:
        raise UserError(f"{path}: tokenizer.eos_id: expected 0 <= eos_id < vocab_size={vocab_size}, got {eos_id}")
    tokenizer = TokenizerInfo(
        path=os.path.join(dir_, tok_file),
        sha256=_get(tok, "sha256", str, "tokenizer.", path),
        vocab_size=vocab_size,
        eos_id=eos_id,
    )

    dtype = _get(obj, "dtype", str, "", path)
    if dtype not in DTYPES:
        raise UserError(f"{path}: dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if vocab_size > DTYPES[dtype]:
        raise UserError(f"{path}: dtype: {dtype} cannot hold token ids of tokenizer.vocab_size={vocab_size}")

    kind = obj.get("kind", "text")
    if kind not in KINDS:
        raise UserError(f"{path}: kind: expected one of {', '.join(KINDS)} for token shards, got {kind!r}")
    splits_raw = _get(obj, "splits", dict, "", path)
    splits = {name: _parse_split(name, s, dir_, path) for name, s in splits_raw.items()}
    return Manifest(
        dir=dir_,
        path=path,
        tokenizer=tokenizer,
        dtype=dtype,
        splits=splits,
        sha256=hashlib.sha256(raw).hexdigest(),
        kind=kind,
    )


def check_token_ids(manifests: "list[Manifest]", vocab_size: int) -> None:
    """Raise UserError naming the first shard whose ids a model of `vocab_size` cannot embed.

    Uses each shard's recorded `max_token_id`; for shards written before it was recorded, the
    manifest's tokenizer.vocab_size bounds the ids instead."""
    for m in manifests:
        for split in m.splits.values():
            for shard in split.shards:
                if shard.max_token_id is not None:
                    if shard.max_token_id >= vocab_size:
                        raise UserError(f"{shard.file}: holds token id {shard.max_token_id} (manifest "
                                        f"{m.path}), but the model's vocab_size is {vocab_size}; expected "
                                        f"ids < {vocab_size} (re-run megalm prep with this model's tokenizer "
                                        "or raise model.vocab_size)")
                elif m.tokenizer.vocab_size > vocab_size:
                    raise UserError(f"{shard.file}: may hold token ids up to {m.tokenizer.vocab_size - 1} "
                                    f"({m.path}: tokenizer.vocab_size {m.tokenizer.vocab_size}, no "
                                    f"max_token_id), but the model's vocab_size is {vocab_size}")
