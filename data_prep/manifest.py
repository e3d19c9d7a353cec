"""`manifest.json` (see docs/interfaces.md): build from per-unit results, write, verify."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import sentencepiece as spm

from megalm.errors import UserError
from megalm.fsio import atomic_write, sha256_file

from .shards import read_counts

FORMAT, FORMAT_VERSION = "megalm-shards", 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
REMOVED_KEYS = ("duplicates", "too_short_chars", "too_short_tokens", "bad_lines")


def percentiles(histogram: dict[int, int], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict:
    """Nearest-rank percentiles of a {value: count} histogram."""
    total = sum(histogram.values())
    out = {}
    for q in qs:
        rank, seen, value = max(1, math.ceil(q * total)), 0, 0
        for value in sorted(histogram):
            seen += histogram[value]
            if seen >= rank:
                break
        out[f"p{round(q * 100)}"] = value if total else 0
    return out


SHARD_KEYS = ("file", "rows", "tokens", "bytes", "sha256", "max_token_id")


def build(results: list[dict], tokenizer: dict, dtype: str, bad_lines: int) -> dict:
    """Combine shard results (in shard order) into the manifest dict."""
    splits = {s: {"documents": 0, "tokens": 0, "shards": []} for s in ("train", "valid")}
    removed = dict.fromkeys(REMOVED_KEYS, 0)
    removed["bad_lines"] = bad_lines
    hist: dict[int, int] = {}
    documents_in = 0
    for result in results:
        documents_in += result["documents_in"]
        for key in ("duplicates", "too_short_chars", "too_short_tokens"):
            removed[key] += result["removed"][key]
        for length, count in result["lengths"]:
            hist[length] = hist.get(length, 0) + count
        for shard in result["shards"]:
            split = splits[shard["split"]]
            split["documents"] += shard["rows"]
            split["tokens"] += shard["tokens"]
            split["shards"].append({k: shard[k] for k in SHARD_KEYS})
    documents = splits["train"]["documents"] + splits["valid"]["documents"]
    stats = {"documents_in": documents_in, "documents": documents,
             "tokens": splits["train"]["tokens"] + splits["valid"]["tokens"],
             "shards": len(splits["train"]["shards"]) + len(splits["valid"]["shards"]),
             "removed": removed, "tokens_per_document": percentiles(hist),
             "work_units": sum(r["units"] for r in results)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "tokenizer": {"path": TOKENIZER_FILE, **tokenizer}, "dtype": dtype,
            "splits": splits, "stats": stats}


def write(out_dir: str | Path, manifest: dict) -> None:
    atomic_write(Path(out_dir) / MANIFEST,
                 (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def load(out_dir: str | Path) -> dict:
    if not Path(out_dir).is_dir():
        raise UserError(f"{out_dir}: expected a shard directory made by `megalm prep`, "
                        f"{'got a file' if Path(out_dir).exists() else 'found nothing'}")
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest (not a finished `megalm prep` output)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format/format_version: expected {FORMAT!r} version "
                        f"{FORMAT_VERSION}, got {manifest.get('format')!r} version "
                        f"{manifest.get('format_version')!r}")
    return manifest


def check_shard(path: Path, expect: dict, dtype: str, vocab_size: int) -> list[str]:
    """Problems with one shard file, as one line each (empty if it matches `expect`)."""
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != expect["bytes"]:
        problems.append(f"{name}: size {size} bytes, manifest says {expect['bytes']} (truncated?)")
    digest = sha256_file(path)
    if digest != expect["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}… does not match manifest "
                        f"{expect['sha256'][:16]}…")
    try:
        rows, tokens, got_dtype, max_id = read_counts(path)
    except (pa.ArrowException, OSError, KeyError) as exc:
        problems.append(f"{name}: not a readable Arrow IPC file ({str(exc).splitlines()[0]})")
        return problems
    if rows != expect["rows"]:
        problems.append(f"{name}: {rows} rows, manifest says {expect['rows']}")
    if tokens != expect["tokens"]:
        problems.append(f"{name}: {tokens} tokens, manifest says {expect['tokens']}")
    if got_dtype != dtype:
        problems.append(f"{name}: tokens are {got_dtype}, manifest says {dtype}")
    recorded = expect.get("max_token_id")
    if recorded is not None and max_id != recorded and rows:
        problems.append(f"{name}: largest token id is {max_id}, manifest max_token_id says "
                        f"{recorded}")
    for what, value in (("max_token_id", recorded), ("largest token id", max_id)):
        if value is not None and value >= vocab_size:
            problems.append(f"{name}: {what} {value} is outside the tokenizer's vocabulary "
                            f"(vocab_size {vocab_size}); expected ids < {vocab_size}")
            break
    return problems


def verify(out_dir: str | Path) -> list[str]:
    """Re-check every shard and the tokenizer copy; returns one line per problem."""
    out_dir = Path(out_dir)
    manifest = load(out_dir)
    # The reader's validation names the file and key of any missing or mistyped field, so a
    # hand-edited or damaged manifest is one line rather than a KeyError below.
    # megalm.data imports torch (2 s and ~190 MB in every prep worker): only verification needs it
    from megalm.data.manifest import load_manifest
    from megalm.data.shards import open_split

    parsed = load_manifest(str(out_dir))
    problems = []
    tok = manifest["tokenizer"]
    tok_path = out_dir / tok["path"]
    vocab = tok["vocab_size"]
    if not tok_path.is_file():
        problems.append(f"{tok['path']}: missing")
    elif sha256_file(tok_path) != tok["sha256"]:
        problems.append(f"{tok['path']}: sha256 does not match manifest tokenizer.sha256")
    else:
        real = spm.SentencePieceProcessor(model_proto=tok_path.read_bytes()).get_piece_size()
        if real != vocab:
            problems.append(f"manifest.json: tokenizer.vocab_size is {vocab} but "
                            f"{tok['path']} has {real} pieces")
            vocab = min(vocab, real)
    for split_name, split in manifest["splits"].items():
        rows = tokens = 0
        for shard in split["shards"]:
            problems += check_shard(out_dir / shard["file"], shard, manifest["dtype"], vocab)
            rows, tokens = rows + shard["rows"], tokens + shard["tokens"]
        if parsed.kind == "sft" and not problems:  # loss_mask: present, uint8, rows as long as tokens

            try:
                open_split(parsed, split_name)
            except UserError as exc:
                problems.append(str(exc))
        if (rows, tokens) != (split["documents"], split["tokens"]):
            problems.append(f"manifest.json: splits.{split_name} totals ({split['documents']} "
                            f"documents, {split['tokens']} tokens) differ from its shards "
                            f"({rows}, {tokens})")
    return problems
