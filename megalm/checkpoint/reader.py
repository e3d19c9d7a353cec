"""Picking and verifying a published checkpoint: the newest whose marker, manifest, sizes and
checksums hold (or a named one), from a checkpoint folder, a checkpoint root or a run directory.
Used by resume (through CheckpointManager), `megalm sample`, finetuning's init_from and export;
what is inside the files is megalm.engine.layout's to decode.

No collectives, nothing written. Every file is checked against the unpickle allowlist
(unpickle.py, plus the caller's `allow`) before anything reads it, so reading never runs code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from megalm.checkpoint.files import MARKER, read_manifest, verify_directory
from megalm.checkpoint.layout import TAG_RE, published_tags, tag_for
from megalm.checkpoint.unpickle import Allow, check_dir
from megalm.errors import UserError

RUN_CHECKPOINTS = "checkpoints"  # a run directory's checkpoint root (runs/<name>/checkpoints)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class CheckpointReader:
    """Read-only view of one checkpoint root."""

    def __init__(self, root: str, verify_threads: int = 4, allow: Callable[[], Allow] = tuple):
        self.dir = os.path.abspath(root)
        self.verify_threads = verify_threads
        self.allow = allow  # the records the files may hold beyond tensors (called when first needed)
        self._verified: dict[str, tuple[int, dict[str, Any]]] = {}  # tag -> (marker mtime, manifest)

    def list_valid(self) -> list[str]:
        """Published checkpoints whose marker, manifest and file sizes check out, newest last.

        Checksums are verified by select(), not here: hashing is the costly part."""
        out = []
        for tag in published_tags(self.dir):
            try:
                verify_directory(os.path.join(self.dir, tag), full=False)
            except (ValueError, OSError):
                continue
            out.append(tag)
        return out

    def size_of(self, tag: str) -> int:
        try:
            return sum(int(f["bytes"]) for f in read_manifest(os.path.join(self.dir, tag))["files"])
        except (ValueError, OSError):
            return 0

    def forget(self, tag: str) -> None:
        """Drop the cached verification of `tag` (it was just replaced)."""
        self._verified.pop(tag, None)

    def _verify(self, tag: str) -> dict[str, Any]:
        path = os.path.join(self.dir, tag)
        try:
            stamp = os.stat(os.path.join(path, MARKER)).st_mtime_ns
        except OSError:
            stamp = -1
        cached = self._verified.get(tag)
        if cached and cached[0] == stamp:
            return cached[1]
        manifest = verify_directory(path, full=True, threads=self.verify_threads)
        check_dir(path, self.allow())  # a refused file is a UserError, never skipped silently
        self._verified[tag] = (stamp, manifest)
        return manifest

    def select(self, tag: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """The newest fully verified checkpoint (or `tag`) and its manifest; each one skipped
        gets one warning line naming it. None when there is none."""
        if tag is not None and not TAG_RE.match(tag):
            raise UserError(f"checkpoint tag {tag!r}: expected a name like {tag_for(100)}")
        candidates = [tag] if tag else list(reversed(published_tags(self.dir)))
        for name in candidates:
            try:
                return name, self._verify(name)
            except (ValueError, OSError) as exc:
                reason = exc if isinstance(exc, ValueError) else exc.strerror
                if tag:
                    raise UserError(f"checkpoint {os.path.join(self.dir, name)}: not loadable ({reason})") from None
                _warn(f"skipping checkpoint {os.path.join(self.dir, name)}: {reason}")
        return None


def resolve(path: str, allow: Callable[[], Allow] = tuple) -> tuple[CheckpointReader, str]:
    """(reader, tag) for a checkpoint directory, a checkpoint root (its newest valid one) or a
    run directory (its checkpoints/ root); the chosen checkpoint is verified."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint (expected a step_NNNNNNNN folder, a checkpoint root or a run "
                        f"directory)")
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file; expected a checkpoint folder (step_NNNNNNNN), a checkpoint root or a "
                        f"run directory")
    if TAG_RE.match(os.path.basename(path)):
        reader, tag = CheckpointReader(os.path.dirname(path), allow=allow), os.path.basename(path)
    else:
        if not published_tags(path) and os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)):
            path = os.path.join(path, RUN_CHECKPOINTS)  # a run directory
        if not published_tags(path):
            raise UserError(f"{path}: holds no checkpoint yet (no {tag_for(100)}-style folder); point at a "
                            f"checkpoint folder, a checkpoint root or a run directory with saved checkpoints")
        reader, tag = CheckpointReader(path, allow=allow), None
    chosen = reader.select(tag)
    if chosen is None:
        raise UserError(f"{path}: no complete, verified checkpoint found (see the warnings above)")
    return reader, chosen[0]
