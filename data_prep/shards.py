"""Arrow IPC shard files and atomic writes.

Nothing is ever written under its final name: bytes go to `.tmp-*` in the same directory, are
fsynced, renamed over the final name, and the directory is fsynced so the rename survives a crash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes, sync_dir: bool = True) -> None:
    """Temp file, fsync, rename. `sync_dir=False` leaves the rename's durability to a later
    `fsync_dir` (the prep pipeline syncs its folders once, before writing the manifest)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; shards are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def remove_temp_files(directory: str | Path) -> int:
    """Delete leftovers of interrupted writes; returns how many were removed."""
    removed = 0
    for p in Path(directory).rglob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def schema(dtype: str) -> pa.Schema:
    return pa.schema([pa.field("tokens", pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))])


def encode_shard(ids: np.ndarray, lengths: np.ndarray, dtype: str) -> bytes:
    """One record batch of `list<dtype>` rows, serialized in the Arrow IPC file format."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    if len(lengths):
        if int(lengths.sum()) >= 1 << 31:
            raise ValueError("shard exceeds 2^31 tokens; lower --shard-size-mb")
        np.cumsum(lengths, out=offsets[1:])
    values = pa.array(ids.astype(dtype, copy=False))
    tokens = pa.ListArray.from_arrays(pa.array(offsets), values,
                                      type=pa.list_(values.type))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema(dtype)) as writer:
        writer.write_batch(pa.record_batch([tokens], schema=schema(dtype)))
    return sink.getvalue().to_pybytes()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_counts(path: str | Path) -> tuple[int, int, str]:
    """(rows, tokens, value dtype) of a shard; raises pa.ArrowException if unreadable."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        rows = tokens = 0
        dtype = str(reader.schema.field("tokens").type.value_type)
        for i in range(reader.num_record_batches):
            col = reader.get_batch(i).column(0)
            rows += len(col)
            if len(col):
                offsets = col.offsets
                tokens += offsets[len(offsets) - 1].as_py() - offsets[0].as_py()
        return rows, tokens, dtype
