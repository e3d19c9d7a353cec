"""Arrow IPC shard files (encoded in memory, published with megalm.fsio.atomic_write)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megalm.fsio import TMP_PREFIX


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


def read_counts(path: str | Path) -> tuple[int, int, str, int]:
    """(rows, tokens, value dtype, largest token id or -1) of a shard; raises
    pa.ArrowException if unreadable."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        rows = tokens = 0
        max_id = -1
        dtype = str(reader.schema.field("tokens").type.value_type)
        for i in range(reader.num_record_batches):
            col = reader.get_batch(i).column(0)
            rows += len(col)
            if len(col):
                offsets = col.offsets
                tokens += offsets[len(offsets) - 1].as_py() - offsets[0].as_py()
                batch_max = pc.max(col.flatten()).as_py()
                max_id = max_id if batch_max is None else max(max_id, batch_max)
        return rows, tokens, dtype, max_id
