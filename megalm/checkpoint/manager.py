"""CheckpointManager: atomic, verified, optionally asynchronous checkpoints of one run.

This is the protocol, engine-agnostic; what the training engine writes and reads is the subclass's
(megalm.engine.checkpointing.DeepSpeedCheckpointManager, DeepSpeed's files).

The names in the checkpoint root are layout.py's. Save protocol (collective): every rank writes
its files under `.tmp-step_N/` (fsynced, hashed while written); the ranks' (path, size, sha256)
lists are gathered on rank 0, which writes the manifest and the COMPLETE marker, renames the
directory to `step_N`, fsyncs the parent, replaces `latest`, and only then deletes checkpoints
beyond `keep_last`. A crash at any point leaves either a `.tmp-` directory (ignored, then deleted
by the next owner) or a complete checkpoint.

Async: the training loop blocks only while the engine's state is copied to CPU memory; the writes
and the collective publication run in a background thread over a dedicated gloo group, so they
never interleave with the training loop's collectives. The next save / load / wait joins it.

One owner: the first collective call takes the run lock (lock.py) on rank 0 before it touches
anything, so a second trainer never deletes the first one's save in progress.

Disk full: a write failing with ENOSPC (on any rank, sync or async) removes that save's files; if
checkpoints older than the newest valid one exist, they are deleted (saying which) and the save
is retried once; otherwise every rank raises DiskFullError, one line naming the volume, the bytes
a checkpoint needs and what to change. Published checkpoints are never touched by a failed save.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable, Protocol

import torch.distributed as dist

from megalm.checkpoint.config import CheckpointConfig
from megalm.checkpoint.files import FileEntry, WriteError, complete_directory, read_manifest, remove_tree
from megalm.checkpoint.layout import CACHE, CLIENT_KEYS, LATEST, LOCK, SET_ASIDE_RE, CheckpointError, tag_for
from megalm.checkpoint.lock import RunLock
from megalm.checkpoint.reader import CheckpointReader
from megalm.checkpoint.resume import plan
from megalm.checkpoint.space import free_bytes, human, volume_of
from megalm.checkpoint.unpickle import Allow
from megalm.config import validate_tree
from megalm.errors import UserError
from megalm.fsio import atomic_write, fsync_dir

Pending = list[tuple[str, str, Any]]  # (path, path inside the checkpoint, snapshot) still to write


class FileSink(Protocol):
    """Where the engine's files of one save went: writes still pending (async) and their buffers."""

    def write_pending(self, pending: Pending) -> tuple[list[FileEntry], list[WriteError]]: ...

    def release(self, pending: Pending) -> None: ...


class DiskFullError(UserError):
    """A checkpoint could not be written for lack of space, even after pruning."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class CheckpointManager(abc.ABC):
    """Saves and loads a training engine's state under `cfg.dir`; see the module docstring. A
    subclass says how the engine writes and reads its files (the abstract methods)."""

    def __init__(self, cfg: CheckpointConfig, *, rank: int, world_size: int, verify_threads: int = 4,
                 read_only: bool = False):
        # read_only: a directory we only read (another run's, or `megalm sample` on a live run):
        # its `.tmp-*` may be a save in progress, so never lock, clean up or write there.
        validate_tree(cfg, "config", "checkpoint")
        if not cfg.dir.strip():
            raise UserError("checkpoint.dir: expected a non-empty path")
        self.read_only = read_only
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.dir = os.path.abspath(cfg.dir)
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise UserError(f"checkpoint.dir: {self.dir} is a file; expected a folder for the run's checkpoints "
                            f"(choose another path or move that file away)")
        self.verify_threads = verify_threads
        self._lock = RunLock(os.path.join(self.dir, LOCK))
        self._group = None
        self._started = False
        self._job: threading.Thread | None = None
        self._job_error: BaseException | None = None
        self.reader = CheckpointReader(self.dir, verify_threads, allow=self.records)
        self._estimate = 0  # bytes of one checkpoint (all ranks); 0 = unknown yet
        self.last_blocked_s = 0.0  # wall time the last save() kept the caller

    # --- collectives on our own gloo group (usable from the background thread) ------------------
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _gather(self, obj: Any) -> list[Any]:
        if not self._distributed():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _bcast(self, obj: Any) -> Any:
        if not self._distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def start(self) -> None:
        """First collective call: make our group; rank 0 takes the run lock and clears crash
        leftovers; everyone learns the outcome (a refused lock raises on every rank)."""
        if self._started:
            return
        if self._distributed() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        problem = None
        if self.rank == 0 and not self.read_only:
            try:
                os.makedirs(self.dir, exist_ok=True)
                self._lock.acquire()
                self._clean_leftovers()
            except UserError as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"checkpoint.dir: cannot use {self.dir} ({exc.strerror})"
        problem = self._bcast(problem)  # also the barrier: nobody writes before the cleanup is done
        if problem:
            raise UserError(problem)
        self._started = True

    def _clean_leftovers(self) -> None:
        for parent in (self.dir, os.path.join(self.dir, CACHE)):
            if not os.path.isdir(parent):
                continue
            for name in sorted(os.listdir(parent)):
                if not name.startswith(".tmp-"):
                    continue
                path = os.path.join(parent, name)
                aside = SET_ASIDE_RE.match(name) if parent == self.dir else None
                if aside and not os.path.exists(os.path.join(parent, aside.group(1))):
                    # A re-save of this step crashed before its replacement was renamed in: the
                    # set-aside original is the only copy, so put it back.
                    _warn(f"restoring checkpoint {aside.group(1)} from {path} (left by an interrupted re-save)")
                    os.rename(path, os.path.join(parent, aside.group(1)))
                    fsync_dir(parent)
                    continue
                _warn(f"removing unfinished checkpoint data {path} (left by an interrupted run)")
                if os.path.isdir(path):
                    remove_tree(path)
                else:
                    os.remove(path)

    def close(self) -> None:
        """Wait for a pending save, then release the run lock (the end of a run)."""
        try:
            self._join()
        except Exception as exc:  # the caller is already failing; do not mask its error
            _warn(f"checkpoint save in progress failed while closing: {exc}")
        finally:
            self._lock.release()
            self._started = False

    def check_space(self, engine) -> None:
        """Rank 0: warn when the volume cannot hold keep_last + 1 checkpoints of this engine's
        estimated size (the newest published one's size when there is one)."""
        if self.rank != 0 or self.read_only:
            return
        sizes = {t: self.reader.size_of(t) for t in self.reader.list_valid()}
        self._estimate = list(sizes.values())[-1] if sizes else self.estimated_bytes(engine)
        need = (self.cfg.keep_last + 1) * self._estimate
        free = free_bytes(self.dir)
        if free + sum(sizes.values()) < need:  # our own older checkpoints get pruned as we go
            _warn(f"{volume_of(self.dir)} has {human(free)} free; checkpoint.keep_last={self.cfg.keep_last} needs "
                  f"room for {self.cfg.keep_last + 1} checkpoints of ~{human(self._estimate)} ({human(need)}): "
                  f"saves may fail with a full disk")

    # --- what the engine writes and reads (the subclass's) ------------------------------------------
    def records(self) -> Allow:
        """Non-tensor objects the engine's files may hold (the unpickle allowlist's additions)."""
        return ()

    @abc.abstractmethod
    def estimated_bytes(self, engine) -> int:
        """A checkpoint of `engine`'s size, all ranks together, before one exists."""

    @abc.abstractmethod
    def layout(self, engine) -> dict[str, Any]:
        """Manifest entries describing how `engine` splits its state (at least dp_world_size)."""

    @abc.abstractmethod
    def dp_size(self, engine) -> int:
        """The data-parallel size `engine` runs with now."""

    @abc.abstractmethod
    def reserved_keys(self) -> set[str]:
        """Client-state keys the engine's own bookkeeping uses."""

    @abc.abstractmethod
    def write_states(self, engine, root: str, state: dict, files: dict[str, bytes], async_save: bool
                     ) -> tuple[FileSink, list[FileEntry], Pending, list[WriteError]]:
        """Collective: every rank writes its files of `engine` (with `state`, the client state, in
        one of them, and rank 0 also `files`) under `root`, or snapshots them when `async_save`.
        Returns the sink, files written, snapshots pending, and errors (recorded, never raised:
        raising on one rank would hang the others)."""

    @abc.abstractmethod
    def client_state_of(self, tag: str) -> dict[str, Any]:
        """The client state saved in checkpoint `tag` (rank 0; weights not read)."""

    @abc.abstractmethod
    def read_states(self, engine, tag: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Collective: load checkpoint `tag` into `engine`; the saved state dict (client state and
        the engine's own keys), or None if the engine read nothing."""

    def save(self, engine, step: int, client_state: dict, files: dict[str, bytes] | None = None) -> str:
        """Collective. Returns the tag. With async_save, returns once state is in CPU memory.
        `files` ({name: bytes}, rank 0's) are written into the checkpoint folder too."""
        if self.read_only:
            raise CheckpointError(f"{self.dir}: opened read-only; refusing to save here")
        t0 = time.perf_counter()
        self.start()
        self._join()
        tag = tag_for(step)
        root = os.path.join(self.dir, f".tmp-{tag}")
        reserved = ({CLIENT_KEYS} | self.reserved_keys()).intersection(client_state)
        if reserved:
            raise ValueError(f"client_state may not use the reserved keys {sorted(reserved)}")
        # The key list lets load() return exactly this dict, not the engine's own extra entries.
        state = dict(client_state)
        state[CLIENT_KEYS] = sorted(client_state)
        if self.rank == 0:
            # From a save that failed earlier in this process. Safe without a barrier of our own:
            # the engine's writers barrier after rank 0 creates the directory, before anyone writes.
            remove_tree(root)
        meta = {"step": step, "tag": tag, "world_size": self.world_size, **self.layout(engine), "time": time.time()}
        for attempt in (0, 1):
            ce, entries, pending, errors = self.write_states(engine, root, state, files or {}, self.cfg.async_save)
            if self.cfg.async_save:
                self._job_error = None
                self._job = threading.Thread(target=self._run_job, name=f"megalm-ckpt-{tag}", daemon=False,
                                             args=(ce, tag, root, entries, pending, errors, meta))
                self._job.start()
                break
            if self._finish(ce, tag, root, entries, pending, errors, meta, attempt):
                break
        self.last_blocked_s = time.perf_counter() - t0
        return tag

    def _run_job(self, *args) -> None:
        try:
            self._finish(*args)
        except BaseException as exc:  # re-raised on the main thread by _join
            self._job_error = exc

    def _join(self) -> None:
        if self._job is not None:
            self._job.join()
            self._job = None
            if self._job_error is not None:
                err, self._job_error = self._job_error, None
                if isinstance(err, (UserError, CheckpointError)):
                    raise err
                raise CheckpointError(str(err)) from err

    def wait(self) -> None:
        """Block until the pending async save is published (all ranks); raise if it failed."""
        self._join()

    def _finish(self, ce: FileSink, tag: str, root: str, entries: list[FileEntry],
                pending: list, errors: list[WriteError], meta: dict[str, Any], attempt: int = 0) -> bool:
        """Collective: write what is pending, then rank 0 publishes; everyone learns the result.
        False: a full disk was made room on; the caller writes the checkpoint again (the async
        path does that here, from the snapshots it still holds)."""
        while True:
            if pending and not errors:
                written, errors = ce.write_pending(pending)
                entries = entries + written
            verdict = self._decide(tag, root, entries, errors, meta, attempt)
            if verdict == "published":
                ce.release(pending)
                return True
            # "retry": each rank removes the files it wrote (nobody else touches them).
            for rel in {e.path for e in entries} | {e.path for e in errors} | {r for _, r, _ in pending}:
                path = os.path.join(root, rel)
                if os.path.isfile(path):
                    os.remove(path)
            attempt += 1
            if not pending:
                return False
            entries, errors = [], []

    def _decide(self, tag: str, root: str, entries: list[FileEntry], errors: list[WriteError],
                meta: dict[str, Any], attempt: int) -> str:
        gathered = self._gather((entries, errors))
        verdict: tuple[str, str] = ("published", "")
        if self.rank == 0:
            errs = [(r, e) for r, (_, es) in enumerate(gathered) for e in es]
            if not errs:
                try:
                    self._publish(tag, root, [e for es, _ in gathered for e in es], meta)
                except Exception as exc:
                    errs = [(0, WriteError.of("(publish)", exc))]
            if errs:
                verdict = self._on_failure(tag, root, errs, sum(e.bytes for es, _ in gathered for e in es), attempt)
        kind, text = self._bcast(verdict)
        if kind == "full":
            raise DiskFullError(text)
        if kind == "failed":
            raise CheckpointError(text)
        return kind

    def _on_failure(self, tag: str, root: str, errs: list[tuple[int, WriteError]], written: int,
                    attempt: int) -> tuple[str, str]:
        """Rank 0, after a failed save: ('retry' | 'full' | 'failed', message)."""
        full = [(r, e) for r, e in errs if e.disk_full]
        if not full:
            return "failed", f"checkpoint {tag} was not saved: " + "; ".join(f"rank {r}: {e.text}" for r, e in errs)
        volume, need = volume_of(self.dir), max(self._estimate, written)
        if attempt == 0:
            pruned = self._prune_for_space()
            if pruned:
                _warn(f"disk full on {volume} while saving checkpoint {tag}: deleted older checkpoints "
                      f"{', '.join(pruned)} (keeping the newest valid one) and retrying once")
                return "retry", ""
        remove_tree(root)
        newest = self.reader.list_valid()
        kept = f"; {newest[-1]} is intact" if newest else ""
        return "full", (f"checkpoint {tag} was not saved: disk full on {volume} ({human(free_bytes(self.dir))} free, "
                        f"a checkpoint of this run needs ~{human(need)}): free space there, lower "
                        f"checkpoint.keep_last (now {self.cfg.keep_last}) or set checkpoint.dir to a larger "
                        f"volume{kept} (first failure: rank {full[0][0]}, {full[0][1].path})")

    def _prune_for_space(self) -> list[str]:
        """Delete every valid checkpoint older than the newest valid one, and the universal
        cache; return the checkpoints deleted."""
        victims = self.reader.list_valid()[:-1]
        for tag in victims:
            remove_tree(os.path.join(self.dir, tag))
        remove_tree(os.path.join(self.dir, CACHE))
        return victims

    def _publish(self, tag: str, root: str, entries: list[FileEntry], meta: dict[str, Any]) -> None:
        complete_directory(root, entries, meta, threads=self.verify_threads)
        final = os.path.join(self.dir, tag)
        aside = None
        if os.path.exists(final):
            # Same step saved again (a run resumed from an older checkpoint): replace it. The old
            # one is set aside, not deleted, until the new one is in place: a crash in between
            # leaves it under a name start() renames back (the only copy, with keep_last=1).
            aside = os.path.join(self.dir, f".tmp-old-{tag}-{os.getpid()}")
            remove_tree(aside)
            os.rename(final, aside)
            fsync_dir(self.dir)
            remove_tree(os.path.join(self.dir, CACHE, tag))  # derived from the old one
        os.rename(root, final)
        fsync_dir(self.dir)
        atomic_write(os.path.join(self.dir, LATEST), tag + "\n")
        self.reader.forget(tag)
        self._estimate = sum(int(f["bytes"]) for f in read_manifest(final)["files"])
        if aside is not None:
            remove_tree(aside)
        self._prune(tag)

    def _prune(self, newest: str) -> None:
        """Delete complete checkpoints beyond keep_last (never the one just published).

        Directories that fail the cheap check are left alone: they are skipped at load anyway and
        may be worth a human's look; counting them as 'kept' could delete the last good one.
        """
        valid = [t for t in self.reader.list_valid() if t != newest]
        for tag in valid[: max(0, len(valid) - (self.cfg.keep_last - 1))]:
            remove_tree(os.path.join(self.dir, tag))
            remove_tree(os.path.join(self.dir, CACHE, tag))

    # --- load ------------------------------------------------------------------------------------
    def list_valid(self) -> list[str]:
        return self.reader.list_valid()

    def resume(self, engine, mode: str, check: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[dict[str, Any], str] | None:
        """Collective. `--resume mode` (resume.py): load into engine and return (client_state,
        directory read), or None to start fresh. Another run's checkpoint is read, never
        written: saves still go to this run's folder."""
        self.start()
        target = plan(self.dir, mode)
        if target is None:
            return None
        where, tag = target
        source = self if where == self.dir else type(self)(
            dataclasses.replace(self.cfg, dir=where), rank=self.rank, world_size=self.world_size, read_only=True)
        cs = source.load(engine, tag, check=check)
        if cs is None:
            if mode != "auto":
                raise UserError(f"--resume {mode}: no loadable checkpoint there")
            return None
        return cs, source.dir

    def load(self, engine, tag: str | None = None,
             check: Callable[[dict[str, Any]], None] | None = None) -> dict | None:
        """Collective. Load `tag` (None: newest valid) into engine; return its client_state,
        or None when there is nothing to resume from. `check(client_state)` runs on rank 0
        before any weight is loaded; a UserError it raises is raised on every rank."""
        self.start()
        self._join()
        chosen = None
        if self.rank == 0:
            try:
                chosen = self.reader.select(tag)
                if chosen is not None and check is not None:
                    try:
                        check(self.client_state_of(chosen[0]))
                    except UserError as exc:
                        raise UserError(f"{os.path.join(self.dir, chosen[0])}: {exc}") from None
            except UserError as exc:
                chosen = exc
        chosen = self._bcast(chosen)
        if isinstance(chosen, UserError):
            raise chosen
        if chosen is None:
            return None
        name, manifest = chosen
        loaded = self.read_states(engine, name, manifest) or {}
        if CLIENT_KEYS not in loaded:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: no {CLIENT_KEYS} entry (not saved by megalm)")
        return {k: loaded[k] for k in loaded[CLIENT_KEYS]}
