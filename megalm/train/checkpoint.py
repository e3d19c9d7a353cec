"""Atomic, verified, optionally asynchronous DeepSpeed checkpoints.

Layout of `checkpoint.dir`:
  step_00000100/   published checkpoint: DeepSpeed's files + manifest.json + COMPLETE
  latest           name of the newest published checkpoint (informational; replaced atomically)
  .tmp-*           work in progress or crash leftovers; deleted when a manager starts, except a
                   `.tmp-old-step_N-*` (a checkpoint set aside while step N is re-saved) whose
                   `step_N` is missing: that one is renamed back
  .universal/      cached universal conversions (see checkpoint_universal.py)

Nothing else is written at the top level: DeepSpeed's offline consolidation scripts
(zero_to_fp32.py, zero_to_torch.py), which it would copy into the root on every save, go inside
each checkpoint instead (covered by its manifest, published with it). Consolidate with
`python DIR/step_N/zero_to_fp32.py DIR OUT --tag step_N` (DeepSpeed's CLI; needs huggingface_hub)
or its convert_zero_checkpoint_to_fp32_state_dict(DIR, OUT, tag=..., max_shard_size=None).

Save protocol (collective): every rank writes its files under `.tmp-step_N/` (fsynced, hashed
while written); the ranks' (path, size, sha256) lists are gathered on rank 0, which writes the
manifest and the COMPLETE marker, renames the directory to `step_N`, fsyncs the parent, replaces
`latest`, and only then deletes checkpoints beyond `keep_last`. A crash at any point leaves
either a `.tmp-` directory (ignored, then deleted) or a complete checkpoint.

Async: the training loop blocks only while DeepSpeed's state is copied to CPU memory; the writes
and the collective publication run in a background thread over a dedicated gloo group, so they
never interleave with the training loop's collectives. The next save / load / wait joins it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megalm.errors import UserError
from megalm.train.checkpoint_engine import MegalmCheckpointEngine
from megalm.train.checkpoint_files import (
    FileEntry, complete_directory, fsync_dir, remove_tree, verify_directory, write_text_atomic)
from megalm.train.checkpoint_universal import (
    CACHE, UNIVERSAL_INFO, UNIVERSAL_INFO_KEY, conversion_needed, ensure_universal)

TAG_RE = re.compile(r"^step_(\d{8,})$")
SET_ASIDE_RE = re.compile(r"^\.tmp-old-(step_\d{8,})-\d+$")
LATEST = "latest"
CLIENT_KEYS = "megalm_client_keys"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def published_tags(ckpt_dir: str) -> list[str]:
    """Directories with a final checkpoint name, oldest first (not yet verified)."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    tags = [n for n in names if TAG_RE.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(tags, key=lambda n: int(TAG_RE.match(n).group(1)))


class CheckpointError(RuntimeError):
    """A save or load that failed on some rank (I/O error, a rank's write missing)."""


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints/run"
    interval: int = 1000  # optimizer steps between saves
    keep_last: int = 3  # published checkpoints kept; older ones deleted after a newer publish
    async_save: bool = False  # write + publish in a background thread

    def __post_init__(self) -> None:
        if not isinstance(self.dir, str) or not self.dir.strip():
            raise UserError(f"checkpoint.dir: must be a non-empty path, got {self.dir!r}")
        for key in ("interval", "keep_last"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"checkpoint.{key}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.async_save, bool):
            raise UserError(f"checkpoint.async_save: must be true or false, got {self.async_save!r}")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class CheckpointManager:
    """Saves and loads DeepSpeed engines under `cfg.dir`; see the module docstring."""

    def __init__(self, cfg: CheckpointConfig, *, rank: int, world_size: int, verify_threads: int = 4,
                 read_only: bool = False):
        # read_only: a directory we only read (another run's, or `megalm sample` on a live run):
        # its `.tmp-*` may be a save in progress, so never clean up or write there.
        self.read_only = read_only
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.dir = os.path.abspath(cfg.dir)
        self.verify_threads = verify_threads
        self._group = None
        self._started = False
        self._job: threading.Thread | None = None
        self._job_error: BaseException | None = None
        self._verified: dict[str, tuple[int, dict[str, Any]]] = {}  # tag -> (marker mtime, manifest)
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

    def _start(self) -> None:
        """First collective call: make our group, clear crash leftovers (rank 0), sync."""
        if self._started:
            return
        if self._distributed():
            self._group = dist.new_group(backend="gloo")
        if self.rank == 0 and not self.read_only:
            os.makedirs(self.dir, exist_ok=True)
            for parent in (self.dir, os.path.join(self.dir, CACHE)):
                if not os.path.isdir(parent):
                    continue
                for name in sorted(os.listdir(parent)):
                    if name.startswith(".tmp-"):
                        path = os.path.join(parent, name)
                        aside = SET_ASIDE_RE.match(name) if parent == self.dir else None
                        if aside and not os.path.exists(os.path.join(parent, aside.group(1))):
                            # A re-save of this step crashed before its replacement was renamed
                            # in: the set-aside original is the only copy, so put it back.
                            _warn(f"restoring checkpoint {aside.group(1)} from {path} (left by an "
                                  f"interrupted re-save)")
                            os.rename(path, os.path.join(parent, aside.group(1)))
                            fsync_dir(parent)
                            continue
                        _warn(f"removing unfinished checkpoint data {path} (left by an interrupted run)")
                        if os.path.isdir(path):
                            remove_tree(path)
                        else:
                            os.remove(path)
        self._bcast(None)  # barrier: nobody writes before the cleanup is done
        self._started = True

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

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective. Returns the tag. With async_save, returns once state is in CPU memory."""
        if self.read_only:
            raise CheckpointError(f"{self.dir}: opened read-only; refusing to save here")
        t0 = time.perf_counter()
        self._start()
        self._join()
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        root = os.path.join(self.dir, tmp_tag)
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
        ce.begin(root, self.cfg.async_save)
        # DeepSpeed (rank 0, ZeRO saves) copies its consolidation scripts into the directory it is
        # given, i.e. our root, on every save, non-atomically and outside any manifest. Send them
        # into the checkpoint being written instead (an instance attribute shadows the method
        # for this call only). complete_directory hashes them into the manifest.
        copy_scripts = getattr(engine, "_copy_recovery_script", None)
        if copy_scripts is not None:
            engine._copy_recovery_script = lambda save_path: copy_scripts(root)
        try:
            engine.save_checkpoint(self.dir, tag=tmp_tag, client_state=state, save_latest=False)
        finally:
            if copy_scripts is not None:
                del engine._copy_recovery_script
            entries, pending, errors = ce.end()
        meta = self._meta(engine, step, tag)
        if self.cfg.async_save:
            self._job_error = None
            self._job = threading.Thread(target=self._run_job, args=(ce, tag, root, entries, pending, errors, meta),
                                         name=f"megalm-ckpt-{tag}", daemon=False)
            self._job.start()
        else:
            self._finish(ce, tag, root, entries, pending, errors, meta)
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
                raise CheckpointError(str(err)) from err

    def wait(self) -> None:
        """Block until the pending async save is published (all ranks); raise if it failed."""
        self._join()

    def _finish(self, ce: MegalmCheckpointEngine, tag: str, root: str, entries: list[FileEntry],
                pending: list, errors: list[str], meta: dict[str, Any]) -> None:
        """Collective: write what is pending, then rank 0 publishes; everyone learns the result."""
        error = f"rank {self.rank}: {'; '.join(errors)}" if errors else None
        try:
            entries = entries + ce.write_pending(pending)
        except Exception as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        gathered = self._gather((entries, error))
        status = None
        if self.rank == 0:
            errors = [e for _, e in gathered if e]
            if errors:
                status = "; ".join(errors)
            else:
                try:
                    self._publish(tag, root, [e for es, _ in gathered for e in es], meta)
                except Exception as exc:
                    status = f"rank 0: {type(exc).__name__}: {exc}"
        status = self._bcast(status)
        if status:
            raise CheckpointError(f"checkpoint {tag} was not saved: {status}")

    def _publish(self, tag: str, root: str, entries: list[FileEntry], meta: dict[str, Any]) -> None:
        complete_directory(root, entries, meta, threads=self.verify_threads)
        final = os.path.join(self.dir, tag)
        aside = None
        if os.path.exists(final):
            # Same step saved again (a run resumed from an older checkpoint): replace it. The old
            # one is set aside, not deleted, until the new one is in place: a crash in between
            # leaves it under a name _start() renames back (the only copy, with keep_last=1).
            aside = os.path.join(self.dir, f".tmp-old-{tag}-{os.getpid()}")
            remove_tree(aside)
            os.rename(final, aside)
            fsync_dir(self.dir)
            remove_tree(os.path.join(self.dir, CACHE, tag))  # derived from the old one
        os.rename(root, final)
        fsync_dir(self.dir)
        write_text_atomic(os.path.join(self.dir, LATEST), tag + "\n")
        self._verified.pop(tag, None)
        if aside is not None:
            remove_tree(aside)
        self._prune(tag)

    def _prune(self, newest: str) -> None:
        """Delete complete checkpoints beyond keep_last (never the one just published).

        Directories that fail the cheap check are left alone: they are skipped at load anyway and
        may be worth a human's look; counting them as 'kept' could delete the last good one.
        """
        valid = [t for t in self.list_valid() if t != newest]
        for tag in valid[: max(0, len(valid) - (self.cfg.keep_last - 1))]:
            remove_tree(os.path.join(self.dir, tag))
            remove_tree(os.path.join(self.dir, CACHE, tag))

    # --- load ------------------------------------------------------------------------------------
    def list_valid(self) -> list[str]:
        """Published checkpoints whose marker, manifest and file sizes check out, newest last.

        Checksums are verified by load() (and select()), not here: hashing is the costly part.
        """
        out = []
        for tag in published_tags(self.dir):
            try:
                verify_directory(os.path.join(self.dir, tag), full=False)
            except (ValueError, OSError):
                continue
            out.append(tag)
        return out

    def _verify(self, tag: str) -> dict[str, Any]:
        path = os.path.join(self.dir, tag)
        try:
            stamp = os.stat(os.path.join(path, "COMPLETE")).st_mtime_ns
        except OSError:
            stamp = -1
        cached = self._verified.get(tag)
        if cached and cached[0] == stamp:
            return cached[1]
        manifest = verify_directory(path, full=True, threads=self.verify_threads)
        self._verified[tag] = (stamp, manifest)
        return manifest

    def select(self, tag: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """Local (no collectives): the newest fully verified checkpoint (or `tag`) and its
        manifest; each one skipped gets one warning line naming it."""
        if tag is not None and not TAG_RE.match(tag):
            raise UserError(f"checkpoint tag {tag!r}: expected a name like {tag_for(100)}")
        candidates = [tag] if tag else list(reversed(published_tags(self.dir)))
        for name in candidates:
            try:
                return name, self._verify(name)
            except (ValueError, OSError) as exc:
                reason = exc if isinstance(exc, ValueError) else exc.strerror
                if tag:
                    raise UserError(f"checkpoint {os.path.join(self.dir, name)}: not loadable ({reason})")
                _warn(f"skipping checkpoint {os.path.join(self.dir, name)}: {reason}")
        return None

    def load(self, engine, tag: str | None = None) -> dict | None:
        """Collective. Load `tag` (None: newest valid) into engine; return its client_state,
        or None when there is nothing to resume from."""
        self._start()
        self._join()
        chosen = None
        if self.rank == 0:
            try:
                chosen = self.select(tag)
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
        loaded = client_state or {}
        if CLIENT_KEYS not in loaded:
            raise CheckpointError(f"{os.path.join(self.dir, name)}: no {CLIENT_KEYS} entry (not saved by megalm)")
        return {k: loaded[k] for k in loaded[CLIENT_KEYS]}
