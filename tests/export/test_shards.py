"""Sharded safetensors written from a stream, read back by the safetensors package itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megalm.export.shards import write_sharded


def test_dtypes_shards_and_index_round_trip(tmp_path):
    torch.manual_seed(0)
    items = [(f"t{i}.{dt}", torch.randn(3 + i, 5).to(dt)) for i, dt in
             enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16])]
    items.append(("steps", torch.arange(7)))
    # 100 bytes per shard: every tensor but the smallest exceeds half of it, so most land alone.
    stats = write_sharded(iter(items), str(tmp_path), max_shard_bytes=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert stats["shards"] > 2 and stats["tensors"] == len(items)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in items) == stats["bytes"]
    got = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert list(index["weight_map"]) == [n for n, _ in items]
    for name, t in items:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_single_file_and_duplicate_names(tmp_path):
    stats = write_sharded(iter([("a", torch.ones(2))]), str(tmp_path))
    assert stats["shards"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="tensor a produced twice"):
        write_sharded(iter([("a", torch.ones(2)), ("a", torch.ones(2))]), str(tmp_path / "x"))
