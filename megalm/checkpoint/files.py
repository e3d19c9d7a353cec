"""File-level pieces of checkpointing: durable writes, the manifest, verification.

A published checkpoint directory holds the engine's files plus:
  manifest.json  -- every other file's relative path, size and sha256, plus run metadata
  COMPLETE       -- the sha256 of manifest.json; written last, before the directory is renamed
                    from its temporary name to its final one.

sha256 was chosen over blake2b because this hardware hashes it ~3x faster (SHA-NI, ~1.5 GB/s per
core against ~0.5 GB/s); each writer hashes its bytes while they are written, so saving costs no
extra read, and load-time verification hashes files in parallel threads (hashlib drops the GIL).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from megalm.fsio import fsync_dir, sha256_file

MANIFEST = "manifest.json"
MARKER = "COMPLETE"
FORMAT = "megalm-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WriteError:
    """A file a rank failed to write (picklable: gathered on rank 0)."""

    path: str  # relative to the checkpoint directory
    text: str
    disk_full: bool

    @classmethod
    def of(cls, rel: str, exc: BaseException) -> "WriteError":
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        return cls(rel, f"{rel}: {type(exc).__name__}: {exc}", full)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint directory, '/'-separated
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it (for torch.save)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes = 0
        self.error: OSError | None = None  # torch.save turns a failed write into a vague RuntimeError

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        try:
            self._raw.write(view)
        except OSError as exc:
            self.error = exc
            raise
        self.bytes += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def write_durably(path: str, write_fn) -> tuple[int, str]:
    """Create `path`, let write_fn(file_like) fill it, fsync it; return (bytes, sha256).

    A failed write raises the OSError itself (errno ENOSPC for a full disk), whatever the
    serializer made of it."""
    writer = None
    try:
        with open(path, "wb") as raw:
            writer = HashingWriter(raw)
            write_fn(writer)
            raw.flush()
            os.fsync(raw.fileno())
    except Exception as exc:
        if writer is not None and writer.error is not None and exc is not writer.error:
            raise writer.error from exc
        raise
    return writer.bytes, writer.hexdigest()


def list_files(root: str) -> list[str]:
    """Relative paths of all regular files under root, sorted."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def fsync_tree(root: str, rel_files: list[str]) -> None:
    """fsync the given files and every directory under root (files written outside our engine)."""
    for rel in rel_files:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for dirpath, _, _ in os.walk(root):
        fsync_dir(dirpath)


def complete_directory(root: str, known: list[FileEntry], meta: dict[str, Any], threads: int = 4) -> None:
    """Write manifest + marker into `root` (still under its temporary name).

    `known` are the entries the ranks hashed while writing; any other file found (e.g. scripts
    DeepSpeed copies in) is hashed and fsynced here. A known file that is missing or whose size
    differs means a rank's write did not land: refuse to complete.
    """
    by_path = {e.path: e for e in known}
    present = [p for p in list_files(root) if p not in (MANIFEST, MARKER)]
    for entry in known:
        full = os.path.join(root, entry.path)
        if not os.path.isfile(full) or os.path.getsize(full) != entry.bytes:
            raise RuntimeError(f"checkpoint file {full} is missing or has the wrong size after save")
    extra = [p for p in present if p not in by_path]
    fsync_tree(root, extra)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(lambda p: sha256_file(os.path.join(root, p)), extra))
    for rel, digest in zip(extra, digests):
        by_path[rel] = FileEntry(rel, os.path.getsize(os.path.join(root, rel)), digest)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                "hash": "sha256", "files": [by_path[p].to_json() for p in sorted(by_path)]}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    with open(os.path.join(root, MANIFEST), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(root, MARKER), "w") as f:
        f.write(hashlib.sha256(text.encode()).hexdigest() + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(root)


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of a completed directory; raises ValueError saying what is wrong."""
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        raise ValueError("no completion marker")
    try:
        with open(os.path.join(root, MANIFEST), "rb") as f:
            raw = f.read()
        with open(marker) as f:
            expected = f.read().strip()
    except OSError as exc:
        raise ValueError(f"unreadable manifest ({exc.strerror})") from None
    if hashlib.sha256(raw).hexdigest() != expected:
        raise ValueError("manifest does not match its completion marker")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown format {manifest.get('format')!r} v{manifest.get('format_version')}")
    return manifest


def verify_directory(root: str, *, full: bool = True, threads: int = 4) -> dict[str, Any]:
    """Check marker, manifest, sizes and (when full) sha256 of every file; return the manifest.

    Raises ValueError naming the first file at fault.
    """
    manifest = read_manifest(root)
    files = manifest["files"]
    for entry in files:
        full_path = os.path.join(root, entry["path"])
        if not os.path.isfile(full_path):
            raise ValueError(f"missing file {entry['path']}")
        if os.path.getsize(full_path) != entry["bytes"]:
            raise ValueError(f"size mismatch in {entry['path']}")
    if full:
        # Largest first, so one big file does not start last and dominate the wall time.
        order = sorted(files, key=lambda e: -e["bytes"])
        with ThreadPoolExecutor(max(1, threads)) as pool:
            digests = list(pool.map(lambda e: sha256_file(os.path.join(root, e["path"])), order))
        for entry, digest in zip(order, digests):
            if digest != entry["sha256"]:
                raise ValueError(f"checksum mismatch in {entry['path']}")
    return manifest


def remove_tree(path: str) -> None:
    """Delete a directory; first renamed to a .tmp- name so a crash mid-delete leaves no
    half-deleted directory under a final name."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path)
    doomed = path if name.startswith(".tmp-") else os.path.join(parent, f".tmp-del-{name}-{os.getpid()}")
    if doomed != path:
        os.rename(path, doomed)
        fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)
