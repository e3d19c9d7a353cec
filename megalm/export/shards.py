"""Sharded safetensors output, written from a stream of (name, tensor) items.

At most one output shard is buffered: when the next tensor would push the buffer past
`max_shard_bytes`, the buffer is written as one safetensors file (8-byte header length, JSON
header, raw little-endian bytes) straight from the tensors' memory, without a serialized copy.
Files get their final `model-0000x-of-0000y.safetensors` names once the count is known, plus
`model.safetensors.index.json` (or a single `model.safetensors`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import torch

from megalm.errors import UserError

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
          torch.int32: "I32"}
DEFAULT_MAX_SHARD_BYTES = 2 << 30


def _raw(t: torch.Tensor) -> memoryview:
    # bf16 has no numpy dtype: the same bytes viewed as int16.
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def safetensors_header(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, int]:
    """(the file's bytes before the data: 8-byte header length + JSON header, data size) for
    `tensors` laid out back to back in order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        if t.dtype not in DTYPES:
            raise UserError(f"{name}: dtype {t.dtype} cannot be written to safetensors here")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offset


def safetensors_bytes(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> bytes:
    """A whole safetensors file in memory (small files: LoRA adapters)."""
    head, _ = safetensors_header(tensors, metadata)
    return head + b"".join(bytes(_raw(t)) for _, t in tensors)


def write_safetensors(path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> int:
    """One safetensors file from `tensors` (in order); returns its size. fsynced."""
    head, size = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for _, t in tensors:
            f.write(_raw(t))
        f.flush()
        os.fsync(f.fileno())
    return len(head) + size


def write_sharded(items: Iterable[tuple[str, torch.Tensor]], out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  on_tensor: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write `items` as safetensors shards under out_dir; returns {"tensors", "bytes", "shards",
    "largest_tensor_bytes", "largest_shard_bytes"}. `on_tensor(nbytes)` is called per tensor (progress)."""
    buffer: list[tuple[str, torch.Tensor]] = []
    size, written, weight_map = 0, [], {}
    stats = {"tensors": 0, "bytes": 0, "largest_tensor_bytes": 0, "largest_shard_bytes": 0}

    def flush() -> None:
        nonlocal buffer, size
        if not buffer:
            return
        tmp = os.path.join(out_dir, f".part-{len(written):05d}.safetensors")
        write_safetensors(tmp, buffer)
        written.append((tmp, [n for n, _ in buffer]))
        stats["largest_shard_bytes"] = max(stats["largest_shard_bytes"], size)
        buffer, size = [], 0

    seen: set[str] = set()
    for name, tensor in items:
        if name in seen:
            raise ValueError(f"tensor {name} produced twice")
        seen.add(name)
        n = tensor.numel() * tensor.element_size()
        if buffer and size + n > max_shard_bytes:
            flush()
        buffer.append((name, tensor.contiguous()))
        size += n
        stats["tensors"] += 1
        stats["bytes"] += n
        stats["largest_tensor_bytes"] = max(stats["largest_tensor_bytes"], n)
        if on_tensor is not None:
            on_tensor(n)
    flush()
    count = len(written)
    for i, (tmp, names) in enumerate(written):
        final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.rename(tmp, os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
    if count > 1:
        index = {"metadata": {"total_size": stats["bytes"]}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    stats["shards"] = count
    return stats
