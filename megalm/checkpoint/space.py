"""Disk space for checkpoints: the volume a directory lives on, its free bytes, and how big a
checkpoint of an engine will be before the first one exists."""

from __future__ import annotations

import os
from typing import Any


def volume_of(path: str) -> str:
    """Mount point holding `path` (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the volume holding `path`."""
    st = os.statvfs(volume_of(path) if not os.path.exists(path) else path)
    return st.f_bavail * st.f_frsize


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def estimate_bytes(engine: Any) -> int:
    """Size of one checkpoint of `engine` on all ranks together, from its parameters: the
    weights in their own dtype, plus (when the optimizer keeps them) fp32 master weights and
    Adam's two fp32 moments. An upper-bound guess; the first published checkpoint replaces it."""
    total = 0
    for p in engine.module.parameters():
        numel = int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 keeps only a shard in p
        master = 4 if p.element_size() < 4 else 0
        total += numel * (p.element_size() + master + 8)
    return total
