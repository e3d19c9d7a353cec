"""CheckpointManager: atomic, verified, optionally asynchronous DeepSpeed checkpoints of one run.

The names in the checkpoint root are layout.py's. Save protocol (collective): every rank writes
its files under `.tmp-step_N/` (fsynced, hashed while written); the ranks' (path, size, sha256)
lists are gathered on rank 0, which writes the manifest and the COMPLETE marker, renames the
directory to `step_N`, fsyncs the parent, replaces `latest`, and only then deletes checkpoints
beyond `keep_last`. A crash at any point leaves either a `.tmp-` directory (ignored, then deleted
by the next owner) or a complete checkpoint.

DeepSpeed's offline consolidation scripts (zero_to_fp32.py, zero_to_torch.py), which it would copy
into the root on every save, go inside each checkpoint instead (covered by its manifest).

Async: the training loop blocks only while DeepSpeed's state is copied to CPU memory; the writes
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

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable

import torch.distributed as dist

from megalm.checkpoint.config import CheckpointConfig
from megalm.checkpoint.ds_engine import MegalmCheckpointEngine
from megalm.checkpoint.files import FileEntry, WriteError, complete_directory, read_manifest, remove_tree
from megalm.checkpoint.layout import (
    CACHE, CLIENT_KEYS, LATEST, LOCK, SET_ASIDE_RE, CheckpointError, tag_for)
from megalm.checkpoint.lock import RunLock
from megalm.checkpoint.space import estimate_bytes, free_bytes, human, volume_of
from megalm.checkpoint.muon_universal import restore_momentum
from megalm.checkpoint.universal import UNIVERSAL_INFO, UNIVERSAL_INFO_KEY, conversion_needed, ensure_universal
from megalm.checkpoint.reader import CheckpointReader
from megalm.checkpoint.resume import plan
from megalm.errors import UserError
from megalm.fsio import atomic_write, fsync_dir


class DiskFullError(UserError):
    """A checkpoint could not be written for lack of space, even after pruning."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class CheckpointManager:
    """Saves and loads DeepSpeed engines under `cfg.dir`; see the module docstring."""

    def __init__(self, cfg: CheckpointConfig, *, rank: int, world_size: int, verify_threads: int = 4,
                 read_only: bool = False):
        # read_only: a directory we only read (another run's, or `megalm sample` on a live run):
        # its `.tmp-*` may be a save in progress, so never lock, clean up or write there.
        cfg.validate()
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
        self.reader = CheckpointReader(self.dir, verify_threads)
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
        stages = int(getattr(engine, "num_stages", 1))  # rank 0 holds one pipeline stage's parameters
        self._estimate = list(sizes.values())[-1] if sizes else estimate_bytes(engine) * stages
        need = (self.cfg.keep_last + 1) * self._estimate
        free = free_bytes(self.dir)
        if free + sum(sizes.values()) < need:  # our own older checkpoints get pruned as we go
            _warn(f"{volume_of(self.dir)} has {human(free)} free; checkpoint.keep_last={self.cfg.keep_last} needs "
                  f"room for {self.cfg.keep_last + 1} checkpoints of ~{human(self._estimate)} ({human(need)}): "
                  f"saves may fail with a full disk")

    # --- save ------------------------------------------------------------------------------------
    def _install(self, engine) -> MegalmCheckpointEngine:
        ce = engine.checkpoint_engine
        if not isinstance(ce, MegalmCheckpointEngine):
            zip_ser = True
            ckpt_cfg = getattr(getattr(engine, "_config", None), "checkpoint_config", None)
            if isinstance(ckpt_cfg, dict):
                zip_ser = bool(ckpt_cfg.get("use_zipfile_serialization", ckpt_cfg.get("serialization", True)))
            ce = MegalmCheckpointEngine(zipfile_serialization=zip_ser)
            engine.checkpoint_engine = ce
        return ce

    @staticmethod
    def _dp_size(engine) -> int:
        return int(getattr(engine, "seq_dp_world_size", None) or engine.dp_world_size)

    def _meta(self, engine, step: int, tag: str) -> dict[str, Any]:
        import deepspeed

        return {"step": step, "tag": tag, "world_size": self.world_size,
                "dp_world_size": self._dp_size(engine),
                "zero_stage": int(engine.zero_optimization_stage()),
                "pipeline_stages": int(getattr(engine, "num_stages", 1)),
                "deepspeed_version": deepspeed.__version__, "time": time.time()}

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
        ce = self._install(engine)
        reserved = {UNIVERSAL_INFO_KEY, CLIENT_KEYS}.intersection(client_state)
        if reserved:
            raise ValueError(f"client_state may not use the reserved keys {sorted(reserved)}")
        # Kept at the top level of the model-states file (readable without us); the key list
        # lets load() return exactly this dict, not DeepSpeed's own extra entries.
        state = dict(client_state)
        state[CLIENT_KEYS] = sorted(client_state)
        state[UNIVERSAL_INFO_KEY] = dict(UNIVERSAL_INFO)
        if self.rank == 0:
            # From a save that failed earlier in this process. Safe without a barrier of our own:
            # save_checkpoint barriers after rank 0 creates the directory, before anyone writes.
            remove_tree(root)
        meta = self._meta(engine, step, tag)
        for attempt in (0, 1):
            entries, pending, errors = self._write(engine, ce, root, state, files or {})
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

    def _write(self, engine, ce: MegalmCheckpointEngine, root: str, state: dict, files: dict[str, bytes]):
        ce.begin(root, self.cfg.async_save)
        # DeepSpeed (rank 0, ZeRO saves) copies its consolidation scripts into the directory it is
        # given, i.e. our root, on every save, non-atomically and outside any manifest. Send them
        # into the checkpoint being written instead (an instance attribute shadows the method
        # for this call only). complete_directory hashes them into the manifest.
        copy_scripts = getattr(engine, "_copy_recovery_script", None)
        if copy_scripts is not None:
            def copy_into_root(save_path: str) -> None:
                try:
                    copy_scripts(root)
                except OSError as exc:  # raising here would skip DeepSpeed's barrier on rank 0 only
                    ce.record_error("zero_to_fp32.py", exc)

            engine._copy_recovery_script = copy_into_root
        try:
            engine.save_checkpoint(self.dir, tag=os.path.basename(root), client_state=state, save_latest=False)
            if self.rank == 0:
                for rel, data in files.items():
                    ce.write_bytes(rel, data)
        finally:
            if copy_scripts is not None:
                del engine._copy_recovery_script
            written = ce.end()
        return written

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

    def _finish(self, ce: MegalmCheckpointEngine, tag: str, root: str, entries: list[FileEntry],
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
        source = self if where == self.dir else CheckpointManager(
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
                        check(self.reader.client_state(chosen[0]))
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
        self._install(engine)
        load_dir, universal = self.dir, conversion_needed(manifest, self._dp_size(engine))
        if universal:
            status = None
            if self.rank == 0:
                try:
                    load_dir = ensure_universal(self.dir, name)
                except Exception as exc:
                    status = f"{type(exc).__name__}: {exc}"
            status = self._bcast(status)
            if status:
                raise CheckpointError(status)
            load_dir = os.path.join(self.dir, CACHE)
        # DeepSpeed reads this flag only inside load_checkpoint, so flipping it around the call
        # is enough; engine builders need not know about a DP change in advance.
        cfg = engine._config
        saved_flag = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = universal
        try:
            path, client_state = engine.load_checkpoint(load_dir, tag=name)
        finally:
            cfg.load_universal_checkpoint = saved_flag
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, name)}")
        if universal:
            restore_momentum(engine)
        loaded = client_state or {}
        if CLIENT_KEYS not in loaded:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: no {CLIENT_KEYS} entry (not saved by megalm)")
        return {k: loaded[k] for k in loaded[CLIENT_KEYS]}
