"""A DeepSpeed CheckpointEngine that hashes + fsyncs what it writes, or defers the write (async).

DeepSpeed's `save_checkpoint` hands every state dict it wants on disk to
`engine.checkpoint_engine.save(state_dict, path)`. We replace that engine on the live
DeepSpeedEngine/PipelineEngine so that:
- sync: each file is written through a hashing writer and fsynced; (path, size, sha256) is
  recorded for the manifest, so rank 0 never re-reads another rank's multi-GB files;
- async: `save` only snapshots the state to CPU memory (storage-exact copy, so the bytes later
  written are identical to what the sync path writes) and queues it; `write_pending` writes the
  queue later from a background thread.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from megalm.checkpoint.files import FileEntry, WriteError, fsync_dir, write_durably
from megalm.engine.layout import load as safe_load

ENGINE_NAME = "MegalmCheckpointEngine"


def snapshot_to_cpu(obj: Any, pool: dict[int, list[torch.Tensor]] | None = None,
                    taken: list[torch.Tensor] | None = None) -> Any:
    """Deep copy of `obj` whose tensors live in fresh CPU memory.

    Storages are copied whole and shared exactly as in the original (two views of one storage
    stay two views of one copied storage), so torch.save writes the same bytes from the copy as
    from the original. Non-tensor leaves are deep-copied so later mutation by the caller (e.g.
    of client_state) cannot leak into the file being written in the background.

    `pool` (nbytes -> free CPU byte buffers) lets repeated saves reuse their memory: fresh pages
    (and pinned allocations, on GPU) cost more than the copy itself. Buffers used are appended
    to `taken` so the caller can return them to the pool once the snapshot is written.
    """
    memo: dict[int, Any] = {}
    storages: dict[tuple[str, int], torch.UntypedStorage] = {}
    pin = torch.cuda.is_available()
    copied_from_gpu = False

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        nonlocal copied_from_gpu
        src = t.untyped_storage()
        key = (str(t.device), src.data_ptr())
        dst = storages.get(key) if src.nbytes() > 0 else None
        if dst is None:
            src_bytes = torch.empty(0, dtype=torch.uint8, device=t.device).set_(src)
            free = pool.get(src.nbytes()) if pool is not None else None
            if free:
                buf = free.pop()
            else:
                buf = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=pin and t.device.type == "cuda")
            if taken is not None:
                taken.append(buf)
            buf.copy_(src_bytes, non_blocking=t.device.type == "cuda")
            copied_from_gpu |= t.device.type == "cuda"
            dst = buf.untyped_storage()
            storages[key] = dst
        out = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)
        if getattr(t, "__dict__", None):
            out.__dict__.update(copy.deepcopy(t.__dict__))
        return out

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if id(x) not in memo:
                memo[id(x)] = copy_tensor(x)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)

    visit(obj)
    result = copy.deepcopy(obj, memo)
    if copied_from_gpu:
        torch.cuda.synchronize()  # the non_blocking copies must land before the caller moves on
    return result


class MegalmCheckpointEngine(CheckpointEngine):
    """See module docstring. One instance per DeepSpeed engine; reused across saves."""

    def __init__(self, zipfile_serialization: bool = True):
        super().__init__(None)
        self.name = ENGINE_NAME
        self._zip = zipfile_serialization
        self._root: str | None = None
        self._async = False
        self._entries: list[FileEntry] = []
        self._errors: list[WriteError] = []
        self._pending: list[tuple[str, str, Any]] = []
        # Snapshot buffers reused across saves; returned by release() once written.
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._pool_lock = threading.Lock()

    # --- our protocol -----------------------------------------------------------------------
    def begin(self, root: str, async_save: bool) -> None:
        """Start collecting the files of one checkpoint written under directory `root`."""
        self._root, self._async = root, async_save
        self._entries, self._pending, self._errors = [], [], []

    def end(self) -> tuple[list[FileEntry], list[tuple[str, str, Any]], list[WriteError]]:
        """Stop collecting; return (entries written so far, snapshots still to write, errors)."""
        out = (self._entries, self._pending, self._errors)
        self._root, self._entries, self._pending, self._errors = None, [], [], []
        return out

    def record_error(self, rel: str, exc: BaseException) -> None:
        """A failure of a write DeepSpeed does itself (reported with this checkpoint's errors)."""
        self._errors.append(WriteError.of(rel, exc))

    def write_one(self, path: str, rel: str, state: Any) -> FileEntry:
        nbytes, digest = write_durably(
            path, lambda f: torch.save(state, f, _use_new_zipfile_serialization=self._zip))
        return FileEntry(rel, nbytes, digest)

    def write_pending(self, pending: list[tuple[str, str, Any]]) -> tuple[list[FileEntry], list[WriteError]]:
        """Write queued snapshots (any thread); stops at the first failure. The snapshots stay
        queued (a retry writes them again) until release()."""
        entries: list[FileEntry] = []
        for path, rel, (state, _) in pending:
            try:
                entries.append(self.write_one(path, rel, state))
            except Exception as exc:
                return entries, [WriteError.of(rel, exc)]
        for directory in {os.path.dirname(path) for path, _, _ in pending}:
            fsync_dir(directory)
        return entries, []

    def release(self, pending: list[tuple[str, str, Any]]) -> None:
        """Return the snapshots' buffers to the pool for the next save."""
        with self._pool_lock:
            for _, _, (_, taken) in pending:
                for buf in taken:
                    self._pool.setdefault(buf.numel(), []).append(buf)
        pending.clear()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """A small file of megalm's own into the checkpoint being written (synchronously, also
        under async_save), hashed for the manifest like DeepSpeed's files."""
        try:
            size, digest = write_durably(os.path.join(self._root, rel), lambda f: f.write(data))
            self._entries.append(FileEntry(rel, size, digest))
        except Exception as exc:
            self.record_error(rel, exc)

    # --- DeepSpeed's CheckpointEngine interface -------------------------------------------------
    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        if self._root is None:
            raise RuntimeError(f"{ENGINE_NAME}: save({path}) outside CheckpointManager.save")
        rel = os.path.relpath(path, self._root).replace(os.sep, "/")
        if rel.startswith(".."):
            raise RuntimeError(f"{ENGINE_NAME}: {path} is outside the checkpoint being written")
        # A failure is recorded, not raised: raising here would skip DeepSpeed's barriers on this
        # rank only and hang the others; the manager reports it to all ranks after its collective.
        try:
            if self._async:
                taken: list[torch.Tensor] = []
                with self._pool_lock:
                    snap = snapshot_to_cpu(state_dict, self._pool, taken)
                self._pending.append((path, rel, (snap, taken)))
            else:
                self._entries.append(self.write_one(path, rel, state_dict))
                fsync_dir(os.path.dirname(path))
        except Exception as exc:
            self.record_error(rel, exc)

    def load(self, path: str, map_location=None) -> Any:
        return safe_load(path, map_location=map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        # Publication (manifest, marker, rename, `latest`) is CheckpointManager's job.
        return True
