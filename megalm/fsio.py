"""Durable file writes: the one place for temp-name + fsync + rename.

Every file megalm publishes (shards, manifests, summaries, build records, `latest`) is written
under a `.tmp-` name in the same directory, fsynced, renamed over the final name, and the
directory is fsynced so the rename itself survives a crash. Readers therefore see the old
content or the new, never a mix, and a crash leaves only `.tmp-*` leftovers to clean up.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from megalm.errors import UserError

TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 8 << 20


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str, sync_dir: bool = True) -> None:
    """Replace `path` with `data` atomically and durably.

    `sync_dir=False` leaves the rename's durability to a later `fsync_dir` of the parent (for
    writers that publish many files and sync their folder once before a final manifest).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; outputs are meant to be shared
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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_checked(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a small file (a tokenizer model), refused in one line naming `what` (the
    file/key that recorded `sha256`) unless they hash to it."""
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path} ({exc.strerror})") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != sha256:
        raise UserError(f"{what}: {path} hashes to {got}, not {sha256}")
    return blob
