"""Input sources -> a stream of documents (str), in a fixed order, never loading a whole file.

Supported: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, text under
`text_key`), `.parquet` (column `text_key`), `.txt` (the whole file is one document),
directories (searched recursively for those suffixes, sorted by relative path), globs
(sorted), and `builtin:python-docs`. A JSON `null` / Parquet null is an empty document.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import zstandard

from megalm.errors import UserError

from . import builtin

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")


@dataclass(frozen=True)
class Source:
    kind: str  # "jsonl" | "parquet" | "txt" | "builtin"
    path: str
    size: int  # bytes on disk (0 for builtin); used for sampling rates and progress


@dataclass
class ReadCounters:
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)


def _kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    return None


def resolve(specs: list[str]) -> list[Source]:
    """Expand inputs (files, directories, globs, builtin names) into an ordered source list."""
    if not specs:
        raise UserError("inputs: expected at least one file, directory, glob or "
                        f"{builtin.NAME}")
    sources: list[Source] = []
    for spec in specs:
        if spec.startswith("builtin:"):
            if spec != builtin.NAME:
                raise UserError(f"input {spec!r}: unknown builtin corpus (known: {builtin.NAME})")
            sources.append(Source("builtin", spec, 0))
            continue
        if os.path.isdir(spec):
            found = sorted((p for p in Path(spec).rglob("*") if p.is_file() and _kind(str(p))),
                           key=lambda p: p.relative_to(spec).as_posix())
            if not found:
                raise UserError(f"input {spec}: directory holds no {', '.join(SUFFIXES)} files")
            paths = [str(p) for p in found]
        elif os.path.isfile(spec):
            if _kind(spec) is None:
                raise UserError(f"input {spec}: unsupported file type (expected "
                                f"{', '.join(SUFFIXES)})")
            paths = [spec]
        else:
            paths = sorted(p for p in glob.glob(spec, recursive=True)
                           if os.path.isfile(p) and _kind(p))
            if not paths:
                raise UserError(f"input {spec}: no such file, directory, or matching "
                                f"{'/'.join(SUFFIXES)} files")
        sources += [Source(_kind(p), p, os.path.getsize(p)) for p in paths]
    return sources


MAX_DOCUMENT_CHARS = 64 << 20


def too_long(where: str, chars: int, max_chars: int) -> UserError:
    return UserError(f"{where}: a document of {chars / (1 << 20):.1f}M characters exceeds "
                     f"--max-document-mb {max_chars / (1 << 20):g} (raise it to accept such "
                     "documents; memory grows with the largest one)")


def iter_documents(sources: list[Source], text_key: str, skip_bad: bool = False,
                   counters: ReadCounters | None = None,
                   max_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """Documents in order; one longer than `max_chars` characters is a UserError."""
    counters = counters if counters is not None else ReadCounters()
    for src in sources:
        if src.kind == "builtin":
            yield from builtin.iter_python_docs()
        elif src.kind == "jsonl":
            yield from _jsonl(src.path, text_key, skip_bad, counters, max_chars)
        elif src.kind == "parquet":
            yield from _parquet(src.path, text_key, max_chars)
        else:
            yield _txt(src.path, max_chars)


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                            closefd=True))
    return open(path, "rb")


class _SlowPath(Exception):
    """The fast reader met something only the line-by-line reader can judge precisely."""


def _jsonl(path: str, key: str, skip_bad: bool, counters: ReadCounters,
           max_chars: int) -> Iterator[str]:
    """Arrow's multithreaded C++ JSON reader first; at the first record it cannot take as-is
    (null/missing key, non-string, bad JSON or UTF-8, huge line) the exact line reader resumes
    after the documents already produced, so both paths yield the same stream."""
    done = 0
    if not skip_bad:
        try:
            for texts in _jsonl_arrow(path, key, max_chars):
                yield from texts
                done += len(texts)
            return
        except _SlowPath:
            pass
    yield from _jsonl_lines(path, key, skip_bad, counters, max_chars, skip_docs=done)


JSON_BLOCK = 8 << 20  # bytes Arrow parses at a time (and the largest line it takes whole)
HEAD_BLOCK = 4 << 20  # the first bytes are parsed alone: workers get work before a full block


def _head(path: str) -> tuple[bytes, bool]:
    """The file's first HEAD_BLOCK bytes cut after their last newline (b"" if the first line
    is longer), and whether that is the whole file."""
    with pa.input_stream(path, compression="detect") as stream:
        head = stream.read(HEAD_BLOCK + 1)
    if len(head) <= HEAD_BLOCK:
        return head, True
    return head[:head.rfind(b"\n") + 1], False


def _jsonl_arrow(path: str, key: str, max_chars: int) -> Iterator[list[str]]:
    opts = pj.ParseOptions(explicit_schema=pa.schema([(key, pa.string())]),
                           unexpected_field_behavior="ignore")

    def texts(col) -> list[str]:
        if col.null_count or (len(col) and pc.max(pc.utf8_length(col)).as_py() > max_chars):
            raise _SlowPath
        return col.to_pylist()

    try:
        # Lines are independent records and a newline byte never occurs inside a UTF-8
        # character, so parsing the head and then the rest yields the same records.
        read_options = pj.ReadOptions(block_size=JSON_BLOCK)
        head, whole = _head(path)
        if head:
            yield texts(pj.read_json(pa.BufferReader(head), read_options=read_options,
                                     parse_options=opts).column(0))
        if whole:
            return
        with pa.input_stream(path, compression="detect") as stream:
            stream.read(len(head))
            reader = pj.open_json(stream, read_options=read_options, parse_options=opts)
            for batch in reader:
                yield texts(batch.column(0))
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError):
        raise _SlowPath from None


def _jsonl_lines(path: str, key: str, skip_bad: bool, counters: ReadCounters, max_chars: int,
                 skip_docs: int = 0) -> Iterator[str]:
    offset = 0
    # A JSON string spends at most 12 bytes per character (a surrogate pair as two \\u escapes):
    # a longer line is too long whatever else it holds, and is not read whole.
    limit = 12 * max_chars + (1 << 16)
    try:
        with _open_binary(path) as f:
            lineno = 0
            while raw := f.readline(limit + 1):
                lineno += 1
                if len(raw) > limit and not raw.endswith(b"\n"):
                    raise UserError(f"{path}:{lineno}: line longer than {limit:,} bytes, more "
                                    f"than a document of --max-document-mb "
                                    f"{max_chars / (1 << 20):g} can take")
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problem = (f"{path}:{lineno}: invalid UTF-8 at byte offset "
                               f"{start + exc.start} (expected UTF-8 text)")
                    if skip_bad:
                        _count_bad(counters, problem)
                        continue
                    raise UserError(problem) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem = (f"{path}:{lineno}: malformed JSON ({exc.msg} at column "
                               f"{exc.colno}); use --skip-bad to skip such lines")
                    if skip_bad:
                        _count_bad(counters, problem)
                        continue
                    raise UserError(problem) from None
                if not isinstance(record, dict) or key not in record:
                    seen = ", ".join(map(str, record)) if isinstance(record, dict) else \
                        f"a JSON {type(record).__name__}, not an object"
                    raise UserError(f"{path}:{lineno}: no key {key!r} (keys seen: "
                                    f"{seen or 'none'}); choose one with --text-key")
                text = record[key]
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: key {key!r} holds a "
                                    f"{type(text).__name__}, expected a string")
                if len(text) > max_chars:
                    raise too_long(f"{path}:{lineno}", len(text), max_chars)
                if skip_docs:
                    skip_docs -= 1
                    continue
                yield text
    except (OSError, EOFError) as exc:  # truncated .gz, unreadable file
        raise UserError(f"{path}: cannot read ({exc}) after byte {offset} of decompressed "
                        "data") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":  # zstandard's backends each define their own
            raise UserError(f"{path}: not a readable zstd stream ({exc}); expected a "
                            ".jsonl.zst made by zstd") from None
        raise


def _count_bad(counters: ReadCounters, problem: str) -> None:
    counters.bad_lines += 1
    if len(counters.bad_examples) < 5:
        counters.bad_examples.append(problem)


def _parquet(path: str, key: str, max_chars: int) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise UserError(f"{path}: no column {key!r} (columns seen: {', '.join(names)}); "
                        "choose one with --text-key")
    col_type = pf.schema_arrow.field(key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise UserError(f"{path}: column {key!r} is {col_type}, expected string")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[key]):
        col = batch.column(0)
        if len(col) and (pc.max(pc.utf8_length(col)).as_py() or 0) > max_chars:
            lengths = pc.utf8_length(col).to_pylist()
            i = next(i for i, n in enumerate(lengths) if n and n > max_chars)
            raise too_long(f"{path}: row {row + i}", lengths[i], max_chars)
        row += len(col)
        for text in col.to_pylist():
            yield "" if text is None else text


def _txt(path: str, max_chars: int) -> str:
    size = os.path.getsize(path)
    if size > 4 * max_chars:  # UTF-8 spends at most 4 bytes per character: not read whole
        raise UserError(f"{path}: {size:,} bytes, more than a document of --max-document-mb "
                        f"{max_chars / (1 << 20):g} can take")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 at byte offset {exc.start} "
                        "(expected UTF-8 text)") from None
    if len(text) > max_chars:
        raise too_long(path, len(text), max_chars)
    return text
