"""The DeepSpeed checkpoint-engine adapter's CPU snapshot (async saves)."""

from __future__ import annotations

import io

import torch

from megalm.engine.checkpoint_engine import snapshot_to_cpu


def test_snapshot_writes_identical_bytes_and_is_independent():
    base = torch.arange(64, dtype=torch.float32)
    param = torch.nn.Parameter(torch.randn(4, 4))
    state = {"a": base[8:24].view(4, 4), "b": base[:8], "same": base[:8], "p": param,
             "n": {"step": 3, "lst": [torch.ones(2, dtype=torch.bfloat16), "x"]}}
    state["alias"] = state["a"]
    snap = snapshot_to_cpu(state)
    orig_bytes, snap_bytes = io.BytesIO(), io.BytesIO()
    torch.save(state, orig_bytes)
    torch.save(snap, snap_bytes)
    assert orig_bytes.getvalue() == snap_bytes.getvalue()
    base.add_(1.0)  # the live state moves on; the snapshot must not
    state["n"]["step"] = 4
    assert snap["b"][0].item() == 0.0 and snap["n"]["step"] == 3
    assert snap["a"].untyped_storage().data_ptr() == snap["b"].untyped_storage().data_ptr()
    assert snap["alias"] is snap["a"] and isinstance(snap["p"], torch.nn.Parameter)
