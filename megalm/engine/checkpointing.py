"""DeepSpeed's side of megalm's checkpoint protocol (megalm.checkpoint.manager): how an engine's
files are written into a checkpoint being saved, and how a published one is loaded back, on the
same or another data-parallel size.

DeepSpeed's offline consolidation scripts (zero_to_fp32.py, zero_to_torch.py), which it would copy
into the checkpoint root on every save, go inside each checkpoint instead (covered by its manifest).
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from megalm.checkpoint.files import FileEntry, WriteError
from megalm.checkpoint.layout import CACHE, CheckpointError
from megalm.checkpoint.manager import CheckpointManager, Pending
from megalm.checkpoint.space import estimate_bytes
from megalm.checkpoint.unpickle import Allow
from megalm.engine import layout
from megalm.engine.checkpoint_engine import MegalmCheckpointEngine
from megalm.engine.muon_universal import restore_momentum
from megalm.engine.universal import UNIVERSAL_INFO, UNIVERSAL_INFO_KEY, ensure_universal


class DeepSpeedCheckpointManager(CheckpointManager):
    """CheckpointManager for DeepSpeedEngine / PipelineEngine (see the module docstring)."""

    def records(self) -> Allow:
        return layout.allowlist()

    def estimated_bytes(self, engine) -> int:
        stages = int(getattr(engine, "num_stages", 1))  # rank 0 holds one pipeline stage's parameters
        return estimate_bytes(engine) * stages

    def dp_size(self, engine) -> int:
        return int(getattr(engine, "seq_dp_world_size", None) or engine.dp_world_size)

    @staticmethod
    def tp_size(engine) -> int:
        return int(getattr(engine, "mp_world_size", 1) or 1)  # AutoTP: the model-parallel size is TP's

    def layout(self, engine) -> dict[str, Any]:
        return {"dp_world_size": self.dp_size(engine), "tensor_parallel": self.tp_size(engine),
                "zero_stage": int(engine.zero_optimization_stage()),
                "pipeline_stages": int(getattr(engine, "num_stages", 1)),
                "deepspeed_version": metadata.version("deepspeed")}

    def reserved_keys(self) -> set[str]:
        return {UNIVERSAL_INFO_KEY}

    def client_state_of(self, tag: str) -> dict[str, Any]:
        return layout.client_state(os.path.join(self.dir, tag))

    @staticmethod
    def _install(engine) -> MegalmCheckpointEngine:
        """Our checkpoint engine on the live DeepSpeed engine (once; reused across saves)."""
        ce = engine.checkpoint_engine
        if not isinstance(ce, MegalmCheckpointEngine):
            zip_ser = True
            ckpt_cfg = getattr(getattr(engine, "_config", None), "checkpoint_config", None)
            if isinstance(ckpt_cfg, dict):
                zip_ser = bool(ckpt_cfg.get("use_zipfile_serialization", ckpt_cfg.get("serialization", True)))
            ce = MegalmCheckpointEngine(zipfile_serialization=zip_ser)
            engine.checkpoint_engine = ce
        return ce

    def write_states(self, engine, root: str, state: dict, files: dict[str, bytes], async_save: bool
                     ) -> tuple[MegalmCheckpointEngine, list[FileEntry], Pending, list[WriteError]]:
        ce = self._install(engine)
        # Kept at the top level of the model-states file: ds_to_universal asserts it is there. Under
        # tensor parallelism AutoTP's schema (which slices merge how) must be the one saved: the
        # client state is written over DeepSpeed's own entry.
        tp_info = getattr(getattr(engine, "module", None), UNIVERSAL_INFO_KEY, None)
        state = {**state, UNIVERSAL_INFO_KEY: dict(tp_info) if tp_info else dict(UNIVERSAL_INFO)}
        ce.begin(root, async_save)
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
            entries, pending, errors = ce.end()
        return ce, entries, pending, errors

    def read_states(self, engine, tag: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
        self._install(engine)
        load_dir, universal = self.dir, layout.conversion_needed(manifest, self.dp_size(engine),
                                                                             self.tp_size(engine))
        if universal:
            status = None
            if self.rank == 0:
                try:
                    ensure_universal(self.dir, tag)
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
            path, client_state = engine.load_checkpoint(load_dir, tag=tag)
        finally:
            cfg.load_universal_checkpoint = saved_flag
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        if universal:
            restore_momentum(engine)
        return client_state
