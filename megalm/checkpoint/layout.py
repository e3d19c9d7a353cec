"""Names inside a checkpoint root: the one place that knows them.

  step_00000100/   a published checkpoint: the engine's files + manifest.json + COMPLETE
  latest           name of the newest published checkpoint (informational; replaced atomically)
  .tmp-*           work in progress or crash leftovers (a `.tmp-old-step_N-PID` is a checkpoint
                   set aside while step N is re-saved)
  .universal/      cached universal conversions (megalm.engine.universal)
  .lock            held (flock) by the run's rank 0 for the whole run; names the holder (lock.py)
"""

from __future__ import annotations

import os
import re

TAG_RE = re.compile(r"^step_(\d{8,})$")
SET_ASIDE_RE = re.compile(r"^\.tmp-old-(step_\d{8,})-\d+$")
LATEST = "latest"
CACHE = ".universal"
LOCK = ".lock"
CLIENT_KEYS = "megalm_client_keys"  # client-state key listing the caller's own keys


class CheckpointError(RuntimeError):
    """A save or load that failed on some rank (I/O error, a rank's write missing)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = TAG_RE.match(tag)
    if not match:
        raise ValueError(f"{tag!r} is not a checkpoint tag (expected a name like {tag_for(100)})")
    return int(match.group(1))


def published_tags(ckpt_dir: str) -> list[str]:
    """Directories with a final checkpoint name, oldest first (not yet verified)."""
    try:
        names = os.listdir(ckpt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    tags = [n for n in names if TAG_RE.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(tags, key=step_of)
